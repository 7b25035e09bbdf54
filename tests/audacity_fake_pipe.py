"""A fake Audacity behind mod-script-pipe: a FIFO server thread that speaks its wire format (opens the "to" FIFO for
reading, then the "from" FIFO for writing, like Audacity's PipeServer; replies = output lines + "BatchCommand
finished: OK|Failed!" + an empty line), in front of either a scripted handler or audacity_fake_project.FakeProject.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

__all__ = ["BARE_NEWLINE", "QUIT", "SILENT", "FakeServer", "parse_command"]

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
