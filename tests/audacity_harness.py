"""Start a real Audacity 3.x under Xvfb with a private HOME whose config enables mod-script-pipe.

Facts this relies on (docs reference.md, appendix "Audacity 3.2.4 (Debian) driven over mod-script-pipe"):
`[Module] mod-script-pipe=1` counts only with a matching `[ModuleDateTime]`; the first start on a fresh config loads
the module twice (dead pipe), so Audacity is started once, killed, and started again; a killed Audacity leaves
autosave files that make the next start show a modal crash-recovery dialog, so TempDir points at a folder of ours
that is emptied, and `[ActiveProjects]` is dropped from the config.

The FIFOs are per user (/tmp/audacity_script_pipe.*.<uid>), so the harness refuses to run while another Audacity of
this user is running. Every process it starts runs in its own session and is killed by process group on stop().
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from clients.audacity.diagnose import running_audacity
from clients.audacity.errors import AudacityError
from clients.audacity.pipe import PipeClient
from clients.audacity.setup import install, module_file_time, read_setting, set_settings
from clients.audacity.transport import default_pipe_paths

MODULE_CANDIDATES = ("/usr/lib/audacity/modules/mod-script-pipe.so", "/usr/lib64/audacity/modules/mod-script-pipe.so",
                     "/usr/local/lib/audacity/modules/mod-script-pipe.so")


class Unavailable(RuntimeError):
    """Audacity (or Xvfb) cannot be used here; the message says why."""


def find_module() -> Path | None:
    for c in MODULE_CANDIDATES:
        if Path(c).is_file():
            return Path(c)
    return None


def write_config(home: Path, module: Path, tempdir: Path) -> Path:
    """`cloak audacity install` into a fresh HOME (this is what tests install()), plus test-only settings."""
    report = install(home=home, platform="linux", module=module, environ={})
    cfg = report.configs[0]
    assert cfg == home / ".audacity-data" / "audacity.cfg", report
    assert read_setting(cfg, "ModuleDateTime", "mod-script-pipe") == module_file_time(module)
    cfg.write_text(set_settings(cfg.read_text(), {
        ("Directories", "TempDir"): str(tempdir), ("GUI", "ShowSplashScreen"): "0",
        ("Quality", "DitherAlgorithmChoice"): "None", ("Quality", "HQDitherAlgorithmChoice"): "None"}))
    return cfg


def drop_active_projects(cfg: Path) -> None:
    if cfg.is_file():
        text = cfg.read_text()
        cfg.write_text(re.sub(r"^\[ActiveProjects\]\n(?:[^\[\n][^\n]*\n?)*", "", text, flags=re.M))


class AudacityHarness:
    def __init__(self, root: Path, startup_timeout: float = 90.0, macros: dict[str, str] | None = None) -> None:
        self.root = root
        self.macros = dict(macros or {})
        self.home = root / "home"
        self.tempdir = root / "audacity-temp"
        self.cfg = self.home / ".audacity-data" / "audacity.cfg"
        self.log_dir = root / "logs"
        self.startup_timeout = startup_timeout
        self.xvfb: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.display: str | None = None
        self.to_path, self.from_path = default_pipe_paths()
        self.starts = 0

    # -- availability
    @staticmethod
    def check() -> None:
        if not sys.platform.startswith("linux"):
            raise Unavailable("the Audacity end-to-end harness runs on Linux only")
        if shutil.which("audacity") is None:
            raise Unavailable("audacity is not installed (apt-get install -y audacity xvfb)")
        if shutil.which("Xvfb") is None:
            raise Unavailable("Xvfb is not installed (apt-get install -y xvfb)")
        if find_module() is None:
            raise Unavailable("this audacity ships no mod-script-pipe module (looked in "
                              f"{', '.join(MODULE_CANDIDATES)})")
        deadline = time.monotonic() + 5  # one that is just exiting (killed by a previous test) goes away
        others = running_audacity()
        while others and time.monotonic() < deadline:
            time.sleep(0.2)
            others = running_audacity()
        if others:
            raise Unavailable(f"another Audacity is running for this user (pids {[p for p, _ in others]}); "
                              "its scripting pipe would collide with the test's")

    # -- processes
    def _start_xvfb(self) -> None:
        r, w = os.pipe()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "xvfb.log", "wb") as log:
            self.xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1280x1024x24",
                                          "-nolisten", "tcp"], pass_fds=(w,), stdout=log, stderr=log,
                                         start_new_session=True)
        os.close(w)
        deadline = time.monotonic() + 20
        data = b""
        with os.fdopen(r, "rb", buffering=0) as f:
            while b"\n" not in data and time.monotonic() < deadline:
                chunk = f.read(16)
                if not chunk:
                    break
                data += chunk
        if not data.strip().isdigit():
            self.stop()
            raise Unavailable(f"Xvfb did not start (see {self.log_dir / 'xvfb.log'})")
        self.display = ":" + data.strip().decode()

    def _start_audacity(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "DBUS_", "WAYLAND"))}
        env.update(HOME=str(self.home), DISPLAY=str(self.display), NO_AT_BRIDGE="1", GTK_A11Y="none")
        self.starts += 1
        with open(self.log_dir / f"audacity-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(["audacity"], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def _kill_audacity(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)

    def clear_stale_fifos(self) -> None:
        for path in (self.to_path, self.from_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _clean_temp(self) -> None:
        shutil.rmtree(self.tempdir, ignore_errors=True)
        self.tempdir.mkdir(parents=True, exist_ok=True)
        drop_active_projects(self.cfg)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.check()
        module = find_module()
        assert module is not None
        self.clear_stale_fifos()
        self.tempdir.mkdir(parents=True, exist_ok=True)
        self.cfg = write_config(self.home, module, self.tempdir)
        for name, text in self.macros.items():
            (self.cfg.parent / "Macros").mkdir(parents=True, exist_ok=True)
            (self.cfg.parent / "Macros" / f"{name}.txt").write_text(text)
        self._start_xvfb()
        # 1st start: initialises the config; on a fresh config the module is loaded twice and the pipe is dead.
        self._start_audacity()
        deadline = time.monotonic() + self.startup_timeout
        while not (os.path.exists(self.to_path) and (self.home / ".audacity-data" / "pluginregistry.cfg").exists()):
            if not self._alive():
                raise Unavailable(f"audacity exited during its first start (see {self.log_dir})")
            if time.monotonic() > deadline:
                raise Unavailable("audacity did not create its scripting pipe during the first start")
            time.sleep(0.2)
        time.sleep(1.0)
        self._kill_audacity()
        self.clear_stale_fifos()
        self._clean_temp()
        # 2nd start: one pipe server, serving any number of successive connections.
        self.restart()

    def restart(self) -> None:
        self._kill_audacity()
        self.clear_stale_fifos()
        self._clean_temp()
        self._start_audacity()
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._alive():
                raise Unavailable(f"audacity exited while starting (see {self.log_dir})")
            if os.path.exists(self.to_path):
                try:
                    with PipeClient(timeout=5, connect_timeout=1) as c:
                        c.tracks()
                    return
                except AudacityError as e:
                    last = e
            time.sleep(0.3)
        raise Unavailable(f"audacity's scripting pipe did not answer within {self.startup_timeout:g} s ({last})")

    def stop(self) -> None:
        self._kill_audacity()
        x, self.xvfb = self.xvfb, None
        if x is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(x.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                x.wait(10)
        self.clear_stale_fifos()
        shutil.rmtree(self.tempdir, ignore_errors=True)

    def __enter__(self) -> AudacityHarness:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
