"""Where Audacity 3.x keeps its settings and macros, and `cloak audacity install`.

`install` (1) enables mod-script-pipe in every Audacity config it finds (a timestamped backup of each file first):
``[Module] mod-script-pipe=1`` plus ``[ModulePath]`` and ``[ModuleDateTime]`` for the module file when it can be
found (Audacity resets the module to "new" and does not load it when the recorded time differs from the file's),
and (2) writes the "Cloak selection" macro into the matching Macros folder. Audacity rewrites its config when it
quits, so it must not be running while the config is edited.

Locations (Audacity 3.x):

=========  =====================================================  ==============================================
OS         config file                                            macros
=========  =====================================================  ==============================================
Linux      ~/.audacity-data/audacity.cfg (3.2 and any version     ~/.audacity-data/Macros
           while that folder exists), else                        $XDG_DATA_HOME/audacity/Macros
           $XDG_CONFIG_HOME/audacity/audacity.cfg (3.3+);
           Flatpak: ~/.var/app/org.audacityteam.Audacity/...
macOS      ~/Library/Application Support/audacity/audacity.cfg    ~/Library/Application Support/audacity/Macros
Windows    %APPDATA%\\audacity\\audacity.cfg                      %APPDATA%\\audacity\\Macros
=========  =====================================================  ==============================================
"""

from __future__ import annotations

import datetime as _dt
import os
import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cloak.files import write_text_atomic

from .macro import MACRO_FILENAME, MACRO_TEXT

__all__ = [
    "InstallReport",
    "Profile",
    "detect_audacity_versions",
    "enable_script_pipe",
    "find_module_file",
    "find_profiles",
    "install",
    "install_macro",
    "module_file_time",
    "read_setting",
    "script_pipe_setting",
    "set_settings",
]


@dataclass(frozen=True)
class Profile:
    """One Audacity settings location."""

    kind: str  # "legacy", "xdg", "flatpak", "macos", "windows"
    config: Path  # audacity.cfg
    macros: Path  # Macros folder


def _home(home: Path | None) -> Path:
    return Path(home) if home is not None else Path.home()


def candidate_profiles(home: Path | None = None, platform: str | None = None,
                       environ: dict[str, str] | None = None) -> list[Profile]:
    """Every place this OS's Audacity 3.x may use, most likely first (whether it exists or not)."""
    h, plat = _home(home), platform or sys.platform
    env = os.environ if environ is None else environ
    if plat == "win32":
        appdata = Path(env.get("APPDATA") or h / "AppData" / "Roaming")
        return [Profile("windows", appdata / "audacity" / "audacity.cfg", appdata / "audacity" / "Macros")]
    if plat == "darwin":
        base = h / "Library" / "Application Support" / "audacity"
        return [Profile("macos", base / "audacity.cfg", base / "Macros")]
    legacy = h / ".audacity-data"
    xdg_config = Path(env.get("XDG_CONFIG_HOME") or h / ".config") / "audacity"
    xdg_data = Path(env.get("XDG_DATA_HOME") or h / ".local" / "share") / "audacity"
    flat = h / ".var" / "app" / "org.audacityteam.Audacity"
    return [Profile("legacy", legacy / "audacity.cfg", legacy / "Macros"),
            Profile("xdg", xdg_config / "audacity.cfg", xdg_data / "Macros"),
            Profile("flatpak", flat / "config" / "audacity" / "audacity.cfg",
                    flat / "data" / "audacity" / "Macros")]


def find_profiles(home: Path | None = None, platform: str | None = None,
                  environ: dict[str, str] | None = None) -> list[Profile]:
    """The profiles whose config file exists; if none does, the one Audacity will create first."""
    cands = candidate_profiles(home, platform, environ)
    existing = [p for p in cands if p.config.is_file()]
    if existing:
        # Audacity on Linux prefers ~/.audacity-data while it exists: an XDG config beside it is unused.
        if existing[0].kind == "legacy":
            existing = [p for p in existing if p.kind != "xdg"]
        return existing
    return cands[:1]


# ------------------------------------------------------------------------------------- config files


def _split_sections(text: str) -> list[tuple[str | None, list[str]]]:
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        m = re.fullmatch(r"\s*\[([^\]]*)\]\s*", line)
        if m:
            sections.append((m.group(1), []))
        else:
            sections[-1][1].append(line)
    return sections


def read_setting(cfg: Path, section: str, key: str) -> str | None:
    if not cfg.is_file():
        return None
    try:
        text = cfg.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for name, lines in _split_sections(text):
        if name == section:
            for line in lines:
                k, sep, v = line.partition("=")
                if sep and k.strip() == key:
                    return v.strip()
    return None


def set_settings(text: str, values: dict[tuple[str, str], str]) -> str:
    """Set [section] key=value entries in wxFileConfig text, keeping everything else as it is."""
    sections = _split_sections(text)
    todo = dict(values)
    for name, lines in sections:
        for i, line in enumerate(lines):
            k, sep, _ = line.partition("=")
            if sep and (name, k.strip()) in todo:
                lines[i] = f"{k.strip()}={todo.pop((name, k.strip()))}"
    for (sec, key), value in list(todo.items()):
        for name, lines in sections:
            if name == sec:
                # before trailing blank lines of the section
                at = len(lines)
                while at > 0 and not lines[at - 1].strip():
                    at -= 1
                lines.insert(at, f"{key}={value}")
                todo.pop((sec, key))
                break
    for (sec, key), value in todo.items():
        existing = next((lines for name, lines in sections if name == sec), None)
        if existing is None:
            sections.append((sec, [f"{key}={value}"]))
        else:
            existing.append(f"{key}={value}")
    out: list[str] = []
    for name, lines in sections:
        if name is not None:
            out.append(f"[{name}]")
        out.extend(lines)
    return "\n".join(out) + "\n"


def script_pipe_setting(profiles: list[Profile] | None = None) -> str | None:
    """[Module] mod-script-pipe of the first existing config ("1" = enabled), None when unknown."""
    for p in profiles if profiles is not None else find_profiles():
        value = read_setting(p.config, "Module", "mod-script-pipe")
        if value is not None:
            return value
    return None


def module_candidates(platform: str | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    plat = platform or sys.platform
    env = os.environ if environ is None else environ
    if plat == "win32":
        roots = [env.get("ProgramFiles", r"C:\Program Files"), env.get("ProgramFiles(x86)", r"C:\Program Files (x86)")]
        return [Path(r) / "Audacity" / "modules" / "mod-script-pipe.dll" for r in roots]
    if plat == "darwin":
        return [Path("/Applications/Audacity.app/Contents/modules/mod-script-pipe.so"),
                Path.home() / "Applications/Audacity.app/Contents/modules/mod-script-pipe.so"]
    out = []
    exe = shutil.which("audacity")
    if exe:
        real = Path(os.path.realpath(exe))
        out += [real.parent.parent / "lib" / "audacity" / "modules" / "mod-script-pipe.so",
                real.parent / "modules" / "mod-script-pipe.so"]
    out += [Path(p) for p in ("/usr/lib/audacity/modules/mod-script-pipe.so",
                              "/usr/lib64/audacity/modules/mod-script-pipe.so",
                              "/usr/local/lib/audacity/modules/mod-script-pipe.so",
                              "/usr/lib/x86_64-linux-gnu/audacity/modules/mod-script-pipe.so")]
    return out


def find_module_file(platform: str | None = None) -> Path | None:
    for c in module_candidates(platform):
        if c.is_file():
            return c
    return None


def module_file_time(path: Path) -> str:
    """The module file's modification time as Audacity records it in [ModuleDateTime] (local time, ISO)."""
    return _dt.datetime.fromtimestamp(Path(path).stat().st_mtime).strftime("%Y-%m-%dT%H:%M:%S")


def _backup(cfg: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = cfg.with_name(f"{cfg.name}.voicecloak-backup-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = cfg.with_name(f"{cfg.name}.voicecloak-backup-{stamp}-{n}")
    shutil.copy2(cfg, dest)
    return dest


@dataclass
class InstallReport:
    configs: list[Path] = field(default_factory=list)
    backups: list[Path] = field(default_factory=list)
    macros: list[Path] = field(default_factory=list)
    module: Path | None = None
    notes: list[str] = field(default_factory=list)
    changed: bool = False


def enable_script_pipe(cfg: Path, module: Path | None, report: InstallReport) -> None:
    values = {("Module", "mod-script-pipe"): "1"}
    if module is not None:
        values[("ModulePath", "mod-script-pipe")] = str(module)
        values[("ModuleDateTime", "mod-script-pipe")] = module_file_time(module)
    old = cfg.read_text(encoding="utf-8", errors="surrogateescape") if cfg.is_file() else ""
    new = set_settings(old, values)
    report.configs.append(cfg)
    if new == old:
        return
    if cfg.is_file():
        report.backups.append(_backup(cfg))
    write_text_atomic(cfg, new, errors="surrogateescape")
    report.changed = True


def install_macro(macros_dir: Path, report: InstallReport) -> Path:
    macros_dir.mkdir(parents=True, exist_ok=True)
    dest = macros_dir / MACRO_FILENAME
    if dest.is_file() and dest.read_text(encoding="utf-8", errors="replace") == MACRO_TEXT:
        report.macros.append(dest)
        return dest
    if dest.is_file():
        report.backups.append(_backup(dest))
    dest.write_text(MACRO_TEXT, encoding="utf-8")
    report.macros.append(dest)
    report.changed = True
    return dest


def install(home: Path | None = None, platform: str | None = None, module: Path | None = None,
            environ: dict[str, str] | None = None) -> InstallReport:
    """Enable mod-script-pipe and install the macro for every Audacity profile found (or the default one)."""
    report = InstallReport()
    plat = platform or sys.platform
    report.module = module or find_module_file(plat)
    if report.module is None:
        report.notes.append("mod-script-pipe's module file was not found, so only [Module] mod-script-pipe=1 was "
                            "written; if Audacity still shows it as 'New' or 'Disabled', enable it in Edit > "
                            "Preferences > Modules and restart Audacity")
    for p in find_profiles(home, plat, environ):
        enable_script_pipe(p.config, report.module, report)
        install_macro(p.macros, report)
        if p.kind == "flatpak":
            report.notes.append("Flatpak Audacity keeps its /tmp private: the pipe is reachable only from inside "
                                "the sandbox; prefer the distribution's package or the AppImage")
    return report


# ------------------------------------------------------------------------------------- versions


def _version_from_text(text: str) -> str | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return ".".join(g for g in m.groups() if g is not None) if m else None


def detect_audacity_versions(home: Path | None = None) -> list[tuple[str, str]]:
    """(where, version) pairs found cheaply: config [Version] entries, dpkg (Linux), the app bundle (macOS)."""
    found: list[tuple[str, str]] = []
    for p in candidate_profiles(home):
        major = read_setting(p.config, "Version", "Major")
        if major:
            minor = read_setting(p.config, "Version", "Minor") or "0"
            micro = read_setting(p.config, "Version", "Micro") or "0"
            found.append((str(p.config), f"{major}.{minor}.{micro}"))
    if sys.platform == "darwin":
        for app in (Path("/Applications/Audacity.app"), Path.home() / "Applications/Audacity.app"):
            try:
                with open(app / "Contents" / "Info.plist", "rb") as f:
                    v = plistlib.load(f).get("CFBundleShortVersionString")
                if v:
                    found.append((str(app), str(v)))
            except (OSError, plistlib.InvalidFileException):
                pass
    elif sys.platform.startswith("linux") and shutil.which("dpkg-query"):
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "audacity"], capture_output=True,
                                 text=True, timeout=5)
            v = _version_from_text(out.stdout) if out.returncode == 0 else None
            if v:
                found.append(("dpkg", v))
        except (OSError, subprocess.SubprocessError):
            pass
    return found
