"""A small client for Audacity's mod-script-pipe (Audacity 3.x scripting).

Why our own client: the pipe has no timeout of its own (a modal dialog in Audacity blocks it forever), answers a
bare newline when no project window is open, and opening its FIFOs in the wrong order deadlocks. This client

* opens the "to" pipe first (POSIX: ``O_WRONLY|O_NONBLOCK``, retried while there is no reader yet, so that a stale
  FIFO left behind by a dead Audacity cannot hang us), writes the first command, and only then opens the "from"
  pipe (``O_NONBLOCK``); on Windows it opens ``\\\\.\\pipe\\ToSrvPipe`` then ``\\\\.\\pipe\\FromSrvPipe`` and reads
  them on a helper thread;
* keeps one connection for many commands (Windows allows one client at a time: "All pipe instances are busy");
* reads each reply up to its terminator (``BatchCommand finished: OK`` or ``... Failed!`` and an empty line) with a
  per-command timeout, and raises a specific :class:`AudacityError` for every way this can go wrong.

Wire format: one command per write, ``Command: Key=Value Key2="with spaces"`` (booleans 1/0), under ~1000 bytes.
Use :func:`format_command` to build commands and :func:`parse_json` for ``Format=JSON`` replies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AudacityError",
    "AudacityGone",
    "CommandFailed",
    "NoProject",
    "PipeBusy",
    "PipeClient",
    "PipeLock",
    "PipeNotFound",
    "PipeTimeout",
    "Reply",
    "UnsupportedAudacity",
    "as_bool",
    "default_pipe_paths",
    "format_command",
    "format_number",
    "parse_json",
]

DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_COMMAND_BYTES = 1000  # the Windows server reads 1024-byte messages
WINDOWS_TO = r"\\.\pipe\ToSrvPipe"
WINDOWS_FROM = r"\\.\pipe\FromSrvPipe"
_TERMINATOR = re.compile(r"(?:^|\n)BatchCommand finished: ([^\n]*)\n\n")

ENABLE_HINT = ("enable it with `cloak audacity install` (or in Audacity: Edit > Preferences > Modules, set "
               "mod-script-pipe to Enabled), then restart Audacity")
AUDACITY4_HINT = ("Audacity 4.x has no scripting pipe yet (mod-script-pipe and the Macro Manager are listed as not yet "
                  "available in 4.0). Use Audacity 3.x for the bridge, or do it by hand: File > Export Audio > "
                  "selected audio as 32-bit float WAV, `cloak protect that.wav`, then File > Import > Audio and "
                  "move the new clip to the selection start")


class AudacityError(Exception):
    """Base class of every bridge error; the message says what to do."""


class PipeNotFound(AudacityError):
    """No scripting pipe: Audacity is not running, mod-script-pipe is not enabled, or the FIFO is stale."""


class UnsupportedAudacity(PipeNotFound):
    """The running / installed Audacity has no scripting pipe (4.x)."""


class PipeBusy(AudacityError):
    """Windows: another client holds the pipe ("All pipe instances are busy")."""


class PipeTimeout(AudacityError):
    """Audacity did not finish answering within the timeout (typically a modal dialog is open)."""


class NoProject(AudacityError):
    """Audacity answered a bare newline without terminator: no project window is open."""


class AudacityGone(AudacityError):
    """Audacity closed the pipe (it quit or crashed)."""


class CommandFailed(AudacityError):
    """The command ran and Audacity answered ``BatchCommand finished: Failed!``."""

    def __init__(self, command: str, output: str, status: str = "Failed!") -> None:
        self.command, self.output, self.status = command, output, status
        detail = output.strip().replace("\n", " | ")
        super().__init__(f"Audacity refused {command!r}: {detail or status}")


@dataclass(frozen=True)
class Reply:
    command: str
    output: str  # the lines before the terminator, one leading newline removed
    status: str  # "OK", "Failed!", ...

    @property
    def ok(self) -> bool:
        return self.status == "OK"


# ------------------------------------------------------------------------------------------ formatting


def format_number(value: float) -> str:
    """Plain decimal text (no exponent: 2.3e-05 is not understood everywhere), enough digits for sample times."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = f"{float(value):.15f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def format_command(name: str, **params: Any) -> str:
    """``Name: Key=Value ...``; strings are double-quoted (they may not contain double quotes or newlines)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ValueError(f"bad command name {name!r}")
    parts = [f"{name}:"]
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            text = format_number(value)
        else:
            s = str(value)
            if '"' in s or "\n" in s or "\r" in s or "\0" in s:
                raise ValueError(f"{name} {key}: text may not contain double quotes or line breaks: {s!r}")
            text = f'"{s}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def as_bool(value: Any) -> bool:
    """GetInfo booleans arrive as 1/0, true/false or quoted strings ("1", "true") depending on the version."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def parse_json(output: str, what: str = "GetInfo") -> Any:
    """The JSON of a ``Format=JSON`` reply (Audacity prints it after a newline)."""
    text = output.strip()
    if not text:
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AudacityError(f"{what}: Audacity answered something that is not JSON ({e}): {text[:200]!r}") from e


# ------------------------------------------------------------------------------------------ transports


def default_pipe_paths(uid: int | None = None) -> tuple[str, str]:
    """(to-server, from-server) pipe paths for this OS."""
    if sys.platform == "win32":
        return WINDOWS_TO, WINDOWS_FROM
    uid = os.getuid() if uid is None else uid
    return f"/tmp/audacity_script_pipe.to.{uid}", f"/tmp/audacity_script_pipe.from.{uid}"


class _FifoTransport:
    """POSIX FIFOs, non-blocking opens and select()-based reads."""

    eol = b"\n"

    def __init__(self, to_path: str, from_path: str) -> None:
        self.to_path, self.from_path = to_path, from_path
        self.wfd: int | None = None
        self.rfd: int | None = None
        self.writer_seen = False

    def open(self, connect_timeout: float) -> None:
        if not os.path.exists(self.to_path):
            raise PipeNotFound(f"{self.to_path} does not exist")
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                fd = os.open(self.to_path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno == errno.ENXIO:  # the FIFO exists but nobody reads it (yet)
                    if time.monotonic() >= deadline:
                        raise PipeNotFound(f"{self.to_path} exists but nothing reads it (a stale pipe left by an "
                                           "Audacity that has quit, or Audacity is still starting)") from e
                    time.sleep(0.05)
                    continue
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise PipeNotFound(f"{self.to_path}: permission denied (it belongs to another user?)") from e
                raise PipeNotFound(f"{self.to_path}: cannot open: {e}") from e
        os.set_blocking(fd, True)
        self.wfd = fd

    def write(self, data: bytes) -> None:
        assert self.wfd is not None
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.wfd, view)
                view = view[n:]
        except BrokenPipeError as e:
            raise AudacityGone("Audacity closed the scripting pipe (it quit or crashed)") from e
        if self.rfd is None:  # only after the first command: the server opens its end when it has one
            self.rfd = os.open(self.from_path, os.O_RDONLY | os.O_NONBLOCK)

    def read(self, timeout: float) -> bytes:
        """Whatever arrives within `timeout` seconds (b"" if nothing)."""
        assert self.rfd is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b""
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                return b""
            data = os.read(self.rfd, 65536)
            if data:
                self.writer_seen = True
                return data
            # EOF: no writer. Before the server opened its end this is normal; after, Audacity has gone.
            if self.writer_seen:
                raise AudacityGone("Audacity closed the scripting pipe (it quit or crashed)")
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        for fd in (self.wfd, self.rfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wfd = self.rfd = None


class _ThreadedTransport:
    """Blocking file handles with a reader thread: Windows named pipes (also works on FIFOs, used in tests)."""

    def __init__(self, to_path: str, from_path: str, eol: bytes = b"\r\n\0") -> None:
        self.to_path, self.from_path, self.eol = to_path, from_path, eol
        self.wf: Any = None
        self.rf: Any = None
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue()
        self.thread: threading.Thread | None = None

    def _open(self, path: str, mode: str, connect_timeout: float) -> Any:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                return open(path, mode, buffering=0)  # noqa: SIM115 - closed in close()
            except FileNotFoundError as e:
                raise PipeNotFound(f"{path} does not exist") from e
            except OSError as e:
                if getattr(e, "winerror", None) == 231 or "busy" in str(e).lower():
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                    raise PipeBusy(f"{path}: all pipe instances are busy: another script is connected to Audacity; "
                                   "close it (only one client at a time)") from e
                raise PipeNotFound(f"{path}: cannot open: {e}") from e

    def open(self, connect_timeout: float) -> None:
        self.wf = self._open(self.to_path, "wb", connect_timeout)
        self.rf = self._open(self.from_path, "rb", connect_timeout)
        self.thread = threading.Thread(target=self._reader, name="audacity-pipe-reader", daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        try:
            while True:
                data = self.rf.read(4096)
                if not data:
                    self.chunks.put(AudacityGone("Audacity closed the scripting pipe (it quit or crashed)"))
                    return
                self.chunks.put(data)
        except (OSError, ValueError) as e:
            self.chunks.put(AudacityGone(f"reading the scripting pipe failed: {e}"))

    def write(self, data: bytes) -> None:
        try:
            self.wf.write(data)
            self.wf.flush()
        except OSError as e:
            raise AudacityGone(f"Audacity closed the scripting pipe: {e}") from e

    def read(self, timeout: float) -> bytes:
        try:
            item = self.chunks.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return b""
        if isinstance(item, BaseException):
            self.chunks.put(item)  # sticky
            raise item
        return item

    def close(self) -> None:
        for f in (self.wf, self.rf):
            if f is not None:
                with contextlib.suppress(OSError, ValueError):
                    f.close()
        self.wf = self.rf = None


# ------------------------------------------------------------------------------------------ client


class PipeClient:
    """One connection to Audacity's scripting pipe.

    >>> with PipeClient() as audacity:
    ...     tracks = audacity.json("GetInfo: Type=Tracks Format=JSON")

    ``command`` raises :class:`CommandFailed` on a ``Failed!`` reply, :class:`PipeTimeout` when no complete reply
    arrives in time (a modal dialog in Audacity, or a command still running), :class:`NoProject` when Audacity
    answers a bare newline (no project window), :class:`AudacityGone` when the pipe closes. A command that timed out
    may still be answered later; its late reply is read and discarded before the next command.
    """

    def __init__(self, to_path: str | None = None, from_path: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 windows: bool | None = None, log: Any = None) -> None:
        default_to, default_from = default_pipe_paths()
        self.to_path = to_path or default_to
        self.from_path = from_path or default_from
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.windows = (sys.platform == "win32") if windows is None else windows
        self.log = log  # optional callable(str): every command and reply status
        self._t: _FifoTransport | _ThreadedTransport | None = None
        self._buf = ""
        self._unanswered = 0

    # -- connection
    @property
    def connected(self) -> bool:
        return self._t is not None

    def connect(self) -> PipeClient:
        if self._t is not None:
            return self
        t = _ThreadedTransport(self.to_path, self.from_path) if self.windows else \
            _FifoTransport(self.to_path, self.from_path)
        try:
            t.open(self.connect_timeout)
        except PipeNotFound as e:
            raise diagnose_missing_pipe(str(e)) from e
        self._t = t
        self._buf = ""
        self._unanswered = 0
        return self

    def close(self) -> None:
        if self._t is not None:
            self._t.close()
            self._t = None

    def __enter__(self) -> PipeClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands
    def _read_reply(self, command: str, timeout: float) -> Reply | None:
        assert self._t is not None
        deadline = time.monotonic() + timeout
        while True:
            m = _TERMINATOR.search(self._buf)
            if m:
                output = self._buf[: m.start()]
                self._buf = self._buf[m.end():]
                if output.startswith("\n"):
                    output = output[1:]
                return Reply(command, output, m.group(1).strip())
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            data = self._t.read(left)
            if data:
                self._buf += data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\0", "")

    def _drain(self, timeout: float) -> None:
        """Read and drop the late replies of commands that timed out."""
        deadline = time.monotonic() + timeout
        while self._unanswered > 0:
            if self._read_reply("(late)", max(0.0, deadline - time.monotonic())) is None:
                raise PipeTimeout(f"Audacity is still busy with an earlier command ({self._unanswered} unanswered): "
                                  "is a dialog open in Audacity? Close it and try again")
            self._unanswered -= 1

    def raw(self, command: str, timeout: float | None = None) -> Reply:
        """Send one command and return its reply, OK or not."""
        if "\n" in command or "\r" in command or "\0" in command:
            raise ValueError(f"one command per line: {command!r}")
        data = command.encode("utf-8")
        if len(data) > MAX_COMMAND_BYTES:
            raise ValueError(f"command is {len(data)} bytes; the pipe takes at most {MAX_COMMAND_BYTES}")
        self.connect()
        assert self._t is not None
        timeout = self.timeout if timeout is None else timeout
        if self._unanswered:
            self._drain(min(timeout, 2.0))
        if self.log:
            self.log(f"> {command}")
        self._t.write(data + self._t.eol)
        self._unanswered += 1
        reply = self._read_reply(command, timeout)
        if reply is None:
            if self._buf and not self._buf.strip():
                # Audacity answers a bare newline and never finishes when no project window is open (#11471).
                self._buf = ""
                self._unanswered -= 1
                raise NoProject("Audacity has no project window open (it answered an empty line): open or create a "
                                "project (File > New) and select some audio")
            name = command.split(":", 1)[0]
            raise PipeTimeout(f"Audacity did not answer {name} within {timeout:g} s: is a dialog open in Audacity "
                              "(an error message, crash recovery, an unsaved-changes question)? Close it and try "
                              "again")
        self._unanswered -= 1
        if self.log:
            self.log(f"< {reply.status}" + (f" ({reply.output.strip()[:200]})" if reply.output.strip() else ""))
        return reply

    def command(self, command: str, timeout: float | None = None) -> str:
        """Send one command; return its output; CommandFailed unless Audacity says OK."""
        reply = self.raw(command, timeout)
        if not reply.ok:
            raise CommandFailed(command, reply.output, reply.status)
        return reply.output

    def do(self, name: str, timeout: float | None = None, **params: Any) -> str:
        return self.command(format_command(name, **params), timeout)

    def json(self, command: str, timeout: float | None = None) -> Any:
        return parse_json(self.command(command, timeout), command.split(":", 1)[0])

    def tracks(self) -> list[dict[str, Any]]:
        return list(self.json("GetInfo: Type=Tracks Format=JSON"))

    def clips(self) -> list[dict[str, Any]]:
        return list(self.json("GetInfo: Type=Clips Format=JSON"))

    def labels(self) -> list[Any]:
        return list(self.json("GetInfo: Type=Labels Format=JSON"))


# ------------------------------------------------------------------------------------------ one at a time


class PipeLock:
    """An inter-process lock (per user) that serialises bridge transactions: the pipe has one reply channel, so two
    clients talking at once (e.g. `watch` polling while a one-shot `cloak-selection` runs) would read each other's
    replies, and the Windows pipe accepts one client at a time anyway. ``watch`` holds it (and its connection) only
    while it polls and works, so a one-shot run waits at most for the job in progress."""

    def __init__(self, path: str | None = None) -> None:
        import tempfile

        uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        self.path = path or os.path.join(tempfile.gettempdir(), f"voicecloak-audacity-{uid}.lock")
        self._f: Any = None

    def _try(self) -> bool:
        assert self._f is not None
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(self._f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def acquire(self, timeout: float | None = None, on_wait: Any = None, cancelled: Any = None) -> None:
        """Wait for the lock (calling on_wait() once if it is taken); PipeBusy after `timeout` seconds."""
        self._f = open(self.path, "a+")  # noqa: SIM115 - kept open while locked
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while not self._try():
            if not told and on_wait is not None:
                on_wait()
                told = True
            if (deadline is not None and time.monotonic() >= deadline) or (cancelled is not None and cancelled()):
                self._f.close()
                self._f = None
                raise PipeBusy("another `cloak audacity` command is using Audacity's pipe (is `cloak audacity "
                               "watch` working on a job?); try again when it is done")
            time.sleep(0.1)

    def release(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                if sys.platform == "win32":
                    import msvcrt

                    self._f.seek(0)
                    msvcrt.locking(self._f.fileno(), msvcrt.LK_UNLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> PipeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ diagnosis


def running_audacity() -> list[tuple[int, str]]:
    """(pid, executable) of running Audacity processes where this can be found out cheaply (Linux /proc)."""
    found: list[tuple[int, str]] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if "audacity" in comm.lower():
            try:
                exe = os.readlink(d / "exe")
            except OSError:
                exe = comm
            found.append((int(d.name), exe))
    return found


def diagnose_missing_pipe(detail: str, versions: Iterable[tuple[str, str]] | None = None,
                          setting: str | None = "?", running: list[tuple[int, str]] | None = None) -> PipeNotFound:
    """Turn "no pipe" into advice: Audacity 4.x? not running? module not enabled? (Arguments are for tests.)"""
    from .setup import detect_audacity_versions, script_pipe_setting

    versions = list(detect_audacity_versions() if versions is None else versions)
    running = running_audacity() if running is None else running
    setting = script_pipe_setting() if setting == "?" else setting
    major4 = [f"{v} ({src})" for src, v in versions if v.split(".")[0].isdigit() and int(v.split(".")[0]) >= 4]
    major3 = [v for _, v in versions if v.split(".")[0] == "3"]
    if major4 and not major3:
        return UnsupportedAudacity(f"no Audacity scripting pipe ({detail}); found Audacity {', '.join(major4)}. "
                                   + AUDACITY4_HINT)
    if setting is not None and setting != "1":
        state = {"0": "disabled", "2": "set to ask", "3": "failed to load", "4": "new (not yet enabled)"}
        return PipeNotFound(f"Audacity's mod-script-pipe module is {state.get(setting, 'not enabled')} "
                            f"([Module] mod-script-pipe={setting}) ({detail}): {ENABLE_HINT}")
    if sys.platform.startswith("linux") and not running:
        hint = "" if setting == "1" else f"; if the pipe is still missing then, {ENABLE_HINT}"
        return PipeNotFound(f"Audacity is not running ({detail}): start Audacity 3.x and open a project{hint}")
    extra = f" (4.x found too: {', '.join(major4)}; {AUDACITY4_HINT})" if major4 else ""
    return PipeNotFound(f"no Audacity scripting pipe ({detail}). Is Audacity 3.x running with mod-script-pipe "
                        f"enabled? If not: {ENABLE_HINT}{extra}")
