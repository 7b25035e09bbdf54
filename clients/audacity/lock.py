"""One bridge transaction at a time: an inter-process lock (per user) around Audacity's scripting pipe."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from .errors import PipeBusy

__all__ = ["PipeLock"]


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
