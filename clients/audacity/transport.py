"""The two ways to talk to Audacity's scripting pipe: POSIX FIFOs read with select() (FifoTransport) and blocking file
handles with a reader thread (ThreadedTransport: Windows named pipes; also works on FIFOs, used in tests).

Opening order matters: the "to" pipe first (POSIX: ``O_WRONLY|O_NONBLOCK``, retried while there is no reader yet, so
that a stale FIFO left behind by a dead Audacity cannot hang us), then the first command is written, and only then
the "from" pipe is opened (``O_NONBLOCK``); on Windows ``\\\\.\\pipe\\ToSrvPipe`` then ``\\\\.\\pipe\\FromSrvPipe``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import sys
import threading
import time
from typing import Any

from .errors import AudacityGone, PipeBusy, PipeNotFound

__all__ = ["WINDOWS_FROM", "WINDOWS_TO", "FifoTransport", "ThreadedTransport", "default_pipe_paths"]

WINDOWS_TO = r"\\.\pipe\ToSrvPipe"
WINDOWS_FROM = r"\\.\pipe\FromSrvPipe"


def default_pipe_paths(uid: int | None = None) -> tuple[str, str]:
    """(to-server, from-server) pipe paths for this OS."""
    if sys.platform == "win32":
        return WINDOWS_TO, WINDOWS_FROM
    uid = os.getuid() if uid is None else uid
    return f"/tmp/audacity_script_pipe.to.{uid}", f"/tmp/audacity_script_pipe.from.{uid}"


class FifoTransport:
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


class ThreadedTransport:
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
