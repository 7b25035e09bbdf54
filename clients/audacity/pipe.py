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

Wire format (:mod:`.commands`): one command per write, ``Command: Key=Value Key2="with spaces"`` (booleans 1/0), under
~1000 bytes. The transports are in :mod:`.transport`, the errors in :mod:`.errors`, the advice when there is no pipe
in :mod:`.diagnose`, the lock that serialises bridge transactions in :mod:`.lock`.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from .commands import Reply, format_command, parse_json
from .diagnose import diagnose_missing_pipe
from .errors import CommandFailed, NoProject, PipeNotFound, PipeTimeout
from .transport import FifoTransport, ThreadedTransport, default_pipe_paths

__all__ = ["CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "MAX_COMMAND_BYTES", "PipeClient"]

DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_COMMAND_BYTES = 1000  # the Windows server reads 1024-byte messages
_TERMINATOR = re.compile(r"(?:^|\n)BatchCommand finished: ([^\n]*)\n\n")


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
        self._t: FifoTransport | ThreadedTransport | None = None
        self._buf = ""
        self._unanswered = 0

    # -- connection
    @property
    def connected(self) -> bool:
        return self._t is not None

    def connect(self) -> PipeClient:
        if self._t is not None:
            return self
        t = ThreadedTransport(self.to_path, self.from_path) if self.windows else \
            FifoTransport(self.to_path, self.from_path)
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
