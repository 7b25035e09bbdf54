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
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from clients.audacity.pipe import AudacityError, PipeClient, default_pipe_paths, running_audacity
from clients.audacity.setup import install, module_file_time, read_setting, set_settings

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


# ============================================================================================ fake Audacity
#
# A FIFO server thread that speaks mod-script-pipe's wire format (opens the "to" FIFO for reading, then the "from"
# FIFO for writing, like Audacity's PipeServer; replies = output lines + "BatchCommand finished: OK|Failed!" + an
# empty line), in front of either a scripted handler or FakeProject, a small model of an Audacity 3.2 project that
# implements the commands the bridge uses with the undo behaviour observed on the real one.

SILENT = object()  # do not answer at all (a modal dialog)
BARE_NEWLINE = object()  # answer "\n" and nothing else (no project window, #11471)
QUIT = object()  # close the pipes and stop serving (Audacity quit or crashed)


def parse_command(line: str) -> tuple[str, dict[str, str]]:
    """'Name: Key=Value Key2="a \\"b\\""' -> ("Name", {...}) (Audacity's escaping: backslash-quote, backslash-n)."""
    name, _, rest = line.partition(":")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] == " ":
            i += 1
        if i >= n:
            break
        j = rest.index("=", i)
        key = rest[i:j].strip()
        i = j + 1
        if i < n and rest[i] == '"':
            i += 1
            buf = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    nxt = rest[i + 1]
                    buf.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
                    i += 2
                else:
                    buf.append(rest[i])
                    i += 1
            i += 1
            params[key] = "".join(buf)
        else:
            j = rest.find(" ", i)
            j = n if j < 0 else j
            params[key] = rest[i:j]
            i = j
    return name.strip(), params


class FakeServer:
    """mod-script-pipe over two FIFOs in `folder`. `handler(line) -> str | (output, ok) | SILENT | BARE_NEWLINE`.
    `chunk` > 0 writes replies in pieces of that many bytes (with a short pause) to exercise reassembly.
    `open_from_early`: open the reply FIFO right after a client connects (True, like PipeServer) or only after the
    first command arrived (False); the client must cope with both."""

    def __init__(self, folder: Path, handler, chunk: int = 0, open_from_early: bool = True,
                 reply_delay: float = 0.0) -> None:
        self.to_path = str(folder / "to.fifo")
        self.from_path = str(folder / "from.fifo")
        os.mkfifo(self.to_path)
        os.mkfifo(self.from_path)
        self.handler = handler
        self.chunk = chunk
        self.open_from_early = open_from_early
        self.reply_delay = reply_delay
        self.commands: list[str] = []
        self.connections = 0
        self.stopping = False
        self.errors: list[BaseException] = []
        import threading

        self.thread = threading.Thread(target=self._serve, name="fake-audacity", daemon=True)
        self.thread.start()

    def _write(self, w, text: str) -> None:
        data = text.encode()
        if self.chunk <= 0:
            w.write(data)
            w.flush()
            return
        for k in range(0, len(data), self.chunk):
            w.write(data[k:k + self.chunk])
            w.flush()
            time.sleep(0.002)

    def _serve(self) -> None:
        try:
            while not self.stopping:
                with open(self.to_path, "rb", buffering=0) as r:
                    if self.stopping:
                        return
                    self.connections += 1
                    w = open(self.from_path, "wb", buffering=0) if self.open_from_early else None  # noqa: SIM115
                    try:
                        buf = b""
                        while True:
                            data = r.read(4096)
                            if not data:
                                break
                            buf += data
                            while b"\n" in buf:
                                raw, buf = buf.split(b"\n", 1)
                                line = raw.decode().replace("\r", "").replace("\0", "")
                                if not line.strip():
                                    continue
                                self.commands.append(line)
                                if w is None:
                                    w = open(self.from_path, "wb", buffering=0)  # noqa: SIM115
                                reply = self.handler(line)
                                if self.reply_delay:
                                    time.sleep(self.reply_delay)
                                if reply is SILENT:
                                    continue
                                if reply is QUIT:
                                    self.stopping = True
                                    return
                                if reply is BARE_NEWLINE:
                                    self._write(w, "\n")
                                    continue
                                output, ok = reply if isinstance(reply, tuple) else (reply, True)
                                text = (output + "\n" if output and not output.endswith("\n") else output)
                                self._write(w, text + f"BatchCommand finished: {'OK' if ok else 'Failed!'}\n\n")
                    except BrokenPipeError:
                        pass
                    finally:
                        if w is not None:
                            with contextlib.suppress(OSError):
                                w.close()
        except BaseException as e:  # noqa: BLE001 - surfaced by the tests
            self.errors.append(e)

    def stop(self) -> None:
        self.stopping = True
        # unblock a server waiting in open(): connect once as a client and leave
        with contextlib.suppress(OSError):
            fd = os.open(self.to_path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        with contextlib.suppress(OSError):
            fd = os.open(self.from_path, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        self.thread.join(5)


def _g6(x: float) -> float:
    return float(f"{x:.6g}")


def _t6(text: str) -> float:
    """Audacity rounds times given in commands to 6 decimals."""
    return round(float(text), 6)


def _t2s(t: float, rate: int) -> int:
    return int(np.floor(t * rate + 0.5))


@dataclass
class FTrack:
    name: str
    kind: str = "wave"
    rate: int = 44100
    channels: int = 1
    clips: list[list] = field(default_factory=list)  # [start sample, ndarray (frames, channels)]
    labels: list[list] = field(default_factory=list)  # [t0, t1, text]
    selected: bool = False
    gain: float = 1.0
    pan: float = 0.0
    mute: bool = False
    solo: bool = False
    fmt: str = "32"
    envelope: list = field(default_factory=list)

    def s_start(self) -> int:
        return min((c[0] for c in self.clips), default=0)

    def s_end(self) -> int:
        return max((c[0] + len(c[1]) for c in self.clips), default=0)

    def dense(self) -> np.ndarray:
        """Samples from 0 to the end (zeros in gaps)."""
        out = np.zeros((self.s_end(), self.channels), np.float32)
        for s, a in self.clips:
            out[s:s + len(a)] = a
        return out

    def render(self, s0: int, s1: int) -> np.ndarray:
        out = np.zeros((max(0, s1 - s0), self.channels), np.float32)
        for s, a in self.clips:
            lo, hi = max(s, s0), min(s + len(a), s1)
            if hi > lo:
                out[lo - s0:hi - s0] = a[lo - s:hi - s]
        return out


class FakeProject:
    """A small Audacity 3.2 project model behind FakeServer (see the module notes)."""

    def __init__(self, rate: int = 44100) -> None:
        self.rate = rate
        self.tracks: list[FTrack] = []
        self.sel = (0.0, 0.0)
        self.prefs: dict[str, str] = {}
        self.clipboard: list[FTrack] = []
        self.history = [self._snap()]
        self.pos = 0
        self.modal = False
        self.fail_on: dict[str, int] = {}  # command -> fail on its n-th call (0 = always)
        self.calls: dict[str, int] = {}
        self.export_ignores_pref = False
        self.lock = __import__("threading").Lock()

    # -- undo model
    def _snap(self):
        return (copy.deepcopy(self.tracks), self.sel)

    def push(self) -> None:
        del self.history[self.pos + 1:]
        self.history.append(self._snap())
        self.pos += 1

    def _restore(self) -> None:
        tracks, self.sel = self.history[self.pos]
        self.tracks = copy.deepcopy(tracks)

    # -- helpers
    def add_wave(self, name: str, audio: np.ndarray, rate: int | None = None, start: int = 0, push: bool = True,
                 **kw) -> FTrack:
        a = audio.reshape(len(audio), -1).astype(np.float32)
        tr = FTrack(name, "wave", rate or self.rate, a.shape[1], [[start, a.copy()]], **kw)
        self.tracks.append(tr)
        if push:
            self.push()
        return tr

    def selected_wave(self) -> list[FTrack]:
        return [t for t in self.tracks if t.kind == "wave" and t.selected]

    def labels_flat(self) -> list[tuple[int, list]]:
        return [(i, lab) for i, t in enumerate(self.tracks) if t.kind == "label" for lab in t.labels]

    def _label_track(self) -> FTrack:
        for t in self.tracks:
            if t.kind == "label" and t.selected:
                return t
        n = sum(t.kind == "label" for t in self.tracks) + 1
        lt = FTrack(f"Labels {n}", "label")
        self.tracks.append(lt)
        return lt

    # -- commands
    def __call__(self, line: str):
        with self.lock:
            if self.modal:
                return SILENT
            name, p = parse_command(line)
            self.calls[name] = self.calls.get(name, 0) + 1
            nth = self.fail_on.get(name)
            if nth is not None and (nth == 0 or nth == self.calls[name]):
                return (f"{name} failed (injected)", False)
            fn = getattr(self, "do_" + name.replace("-", "_"), None)
            if name.startswith("Macro_"):
                fn = self.do_Macro
            if fn is None:
                return (f"Your batch command of {name} was not recognized.", False)
            return fn(p)

    def do_GetInfo(self, p):
        kind = p.get("Type")
        if kind == "Tracks":
            out = []
            for t in self.tracks:
                d = {"name": t.name, "focused": 0, "selected": int(t.selected), "kind": t.kind}
                if t.kind == "wave":
                    d.update(start=_g6(t.s_start() / t.rate), end=_g6(t.s_end() / t.rate), pan=t.pan, gain=t.gain,
                             channels=t.channels, solo=int(t.solo), mute=int(t.mute))
                out.append(d)
        elif kind == "Clips":
            out = [{"track": i, "start": _g6(s / t.rate), "end": _g6((s + len(a)) / t.rate), "color": 0}
                   for i, t in enumerate(self.tracks) if t.kind == "wave"
                   for s, a in sorted(t.clips, key=lambda c: c[0])]
        elif kind == "Labels":
            out = [[i, [[_g6(a), _g6(b), text] for a, b, text in t.labels]] for i, t in enumerate(self.tracks)
                   if t.kind == "label"]
        elif kind == "Envelopes":
            out = [{"track": i, "clip": k, "start": _g6(s / t.rate), "end": _g6((s + len(a)) / t.rate),
                    "points": t.envelope} for i, t in enumerate(self.tracks) if t.kind == "wave"
                   for k, (s, a) in enumerate(t.clips)]
        else:
            self.modal = True  # the real one opens an error dialog for a bad Type
            return SILENT
        return "\n" + json.dumps(out)

    def do_Select(self, p):
        self.sel = (_t6(p.get("Start", "0")), _t6(p.get("End", "0")))
        return self.do_SelectTracks(p)

    def do_SelectTime(self, p):
        self.sel = (_t6(p.get("Start", "0")), _t6(p.get("End", "0")))
        return ""

    def do_SelectTracks(self, p):
        first, count = int(p.get("Track", 0)), int(p.get("TrackCount", 1))
        mode = p.get("Mode", "Set")
        for i, t in enumerate(self.tracks):
            inside = first <= i < first + count
            if mode == "Set":
                t.selected = inside
            elif mode == "Add" and inside:
                t.selected = True
            elif mode == "Remove" and inside:
                t.selected = False
        return ""

    def do_SelectNone(self, p):
        for t in self.tracks:
            t.selected = False
        return ""

    def do_SelectAll(self, p):
        for t in self.tracks:
            t.selected = True
        self.sel = (0.0, max((t.s_end() / t.rate for t in self.tracks if t.kind == "wave"), default=0.0))
        return ""

    def do_AddLabel(self, p):
        self._label_track().labels.append([self.sel[0], self.sel[1], ""])
        self.push()
        return ""

    def do_SetLabel(self, p):
        i = int(p["Label"])
        flat = self.labels_flat()
        if i >= len(flat):
            return ("Label index out of range", False)
        flat[i][1][2] = p.get("Text", flat[i][1][2])
        self.push()
        return ""

    def _mark(self) -> None:
        wave = self.selected_wave()
        ids = ",".join(str(i) for i, t in enumerate(self.tracks) if t.kind == "wave" and t.selected)
        t0, t1 = self.sel
        r = wave[0].rate
        end = t0 + (_t2s(t1, r) - _t2s(t0, r)) / r
        self._label_track().labels.append([t0, end, f"cloak:pending tracks={ids} start={t0:.9f} end={end:.9f}"])

    def do_NyquistPrompt(self, p):
        code = p.get("Command", "")
        wave = self.selected_wave()
        if not wave or self.sel[1] <= self.sel[0]:
            self.modal = True  # "Nyquist Prompt requires one or more tracks to be selected."
            return SILENT
        if "SetPreference: Name=/VoiceCloak/Probe" in code:
            t0, t1 = self.sel
            for k, t in enumerate(wave, 1):
                n = _t2s(t1, t.rate) - _t2s(t0, t.rate)
                self.prefs[f"/VoiceCloak/Probe{k}"] = (
                    f"{t0:.9f} {n} {float(t.rate):.9f} {float(self.rate):.9f} {t.s_start() / t.rate:.9f} "
                    f"{t.s_end() / t.rate:.9f} {float(t.fmt):.9f}")
        elif "cloak:pending" in code:
            self._mark()
        return ""

    def do_Macro(self, p):
        if not self.selected_wave() or self.sel[1] <= self.sel[0]:
            self.modal = True
            return SILENT
        self._mark()
        self.push()
        return ""

    def do_GetPreference(self, p):
        if p["Name"] not in self.prefs:
            return ("", False)
        return self.prefs[p["Name"]]

    def do_SetPreference(self, p):
        self.prefs[p["Name"]] = p.get("Value", "")
        return ""

    def do_Export2(self, p):
        wave = [t for t in self.selected_wave() if not t.mute]
        if not wave:
            self.modal = True  # "All selected audio is muted."
            return SILENT
        s0 = _t2s(self.sel[0], self.rate)
        s1 = min(_t2s(self.sel[1], self.rate), max(t.s_end() for t in wave))
        ch = int(p.get("NumChannels", 1))
        mix = np.zeros((max(0, s1 - s0), ch), np.float32)
        for t in wave:
            a = t.render(s0, s1) * np.float32(t.gain)
            mix += a if a.shape[1] == ch else np.repeat(a.mean(1, keepdims=True), ch, 1)
        floaty = self.prefs.get("/FileFormats/ExportFormat_SF1_Type/WAV_10000") == "6" and \
            not self.export_ignores_pref
        sf.write(p["Filename"], mix, self.rate, subtype="FLOAT" if floaty else "PCM_16")
        return f"Exported to WAV format: {p['Filename']}"

    def do_Import2(self, p):
        path = Path(p["Filename"])
        if not path.is_file():
            return (f"Could not open file: {path}", False)
        info = sf.info(str(path))
        a, rate = sf.read(str(path), dtype="float32", always_2d=True)
        self.tracks.append(FTrack(path.stem, "wave", rate, a.shape[1], [[0, a]],
                                  fmt="32" if info.subtype == "FLOAT" else "16"))
        self.push()
        return ""

    def do_SetClip(self, p):
        clips = [c for t in self.tracks if t.kind == "wave" for c in sorted(t.clips, key=lambda c: c[0])]
        k = int(p["Clip"])
        if k >= len(clips):
            return ("Clip index out of range", False)
        owner = next(t for t in self.tracks if any(c is clips[k] for c in t.clips))
        clips[k][0] = _t2s(_t6(p["Start"]), owner.rate)
        return ""

    def do_SetTrack(self, p):
        t = self.tracks[int(p["Track"])]
        if "Name" in p:
            t.name = p["Name"]
        return ""

    def do_Copy(self, p):
        self.clipboard = []
        for t in self.selected_wave():
            s0, s1 = _t2s(self.sel[0], t.rate), _t2s(self.sel[1], t.rate)
            c = FTrack(t.name, "wave", t.rate, t.channels, [], fmt=t.fmt)
            for s, a in t.clips:
                lo, hi = max(s, s0), min(s + len(a), s1)
                if hi > lo:
                    c.clips.append([lo - s0, a[lo - s:hi - s].copy()])
            self.clipboard.append(c)
        return ""

    def do_Paste(self, p):
        if not self.clipboard:
            return ("Nothing to paste", False)
        targets = self.selected_wave()
        if not targets:
            for c in self.clipboard:
                nt = copy.deepcopy(c)
                nt.selected = True
                self.tracks.append(nt)
            self.push()
            return ""
        for t, c in zip(targets, self.clipboard, strict=False):
            s0, s1 = _t2s(self.sel[0], t.rate), _t2s(self.sel[1], t.rate)
            d = t.dense()
            ins = c.render(0, c.s_end())
            start = t.s_start()
            new = np.concatenate([d[:s0], ins, d[s1:]])
            t.clips = [[start, new[start:]]]
        self.push()
        return ""

    def do_Undo(self, p):
        if self.pos > 0:
            self.pos -= 1
            self._restore()
        return ""

    def do_Redo(self, p):
        if self.pos + 1 < len(self.history):
            self.pos += 1
            self._restore()
        return ""

    def do_RemoveTracks(self, p):
        self.tracks = [t for t in self.tracks if not t.selected]
        self.push()
        return ""
