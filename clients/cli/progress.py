"""Progress and cancellation of a long command: tqdm bars or plain log lines on stderr, and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import cloak
from cloak import CancelToken, ProtectConfig


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Reporter:
    """Progress on stderr: tqdm bars on a terminal, plain log lines otherwise, nothing with quiet."""

    def __init__(self, n_files: int, config: ProtectConfig, quiet: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and _columns(self.stream) > 0
        self.n = n_files
        self.weights = config.loss_weights
        self.overall: Any = None
        self.bar: Any = None
        self.index = 0
        self.name = ""
        self.last_decile = -1
        self.last_log = 0.0
        if self.tty and not quiet:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=n_files, desc="files", unit="file", position=0, file=self.stream,
                                dynamic_ncols=True)

    def message(self, msg: str) -> None:
        """A line on stderr that does not break the bars."""
        if self.overall is not None:
            self._tqdm.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def result(self, line: str) -> None:
        """A line on stdout (a result) that does not break the bars when both go to the same terminal."""
        if self.overall is not None:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.message(msg)

    def start_file(self, index: int, path: Path) -> None:
        self.index, self.name = index, path.name
        self.last_decile, self.last_log = -1, time.monotonic()
        if self.overall is not None:
            self.bar = self._tqdm(total=None, desc=self.name[:30], unit="it", position=1, leave=False,
                                  file=self.stream, dynamic_ncols=True)

    def _terms(self, losses: dict[str, float]) -> str:
        total = sum(self.weights.get(k, 0.0) * v for k, v in losses.items())
        return " ".join(f"{k}={v:.4g}" for k, v in losses.items()) + f" total={total:.4g}"

    def __call__(self, p: cloak.Progress) -> None:
        if self.quiet:
            return
        done = p.window * p.iterations + p.iteration
        total = p.windows * p.iterations
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.reset(total=total)
            self.bar.n = done
            self.bar.set_postfix_str(f"win {p.window + 1}/{p.windows} {self._terms(p.losses)}", refresh=False)
            self.bar.refresh()
            return
        decile = int(10 * done / max(total, 1))
        now = time.monotonic()
        if decile != self.last_decile or done == total or now - self.last_log >= 60:
            self.last_decile, self.last_log = decile, now
            self.message(f"cloak: [{self.index + 1}/{self.n}] {self.name}: iteration {done}/{total} "
                         f"({100 * done / max(total, 1):.0f}%) {self._terms(p.losses)} "
                         f"elapsed {p.elapsed_s:.1f}s eta {p.eta_s:.1f}s")

    def end_file(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.overall is not None:
            self.overall.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.overall is not None:
            self.overall.close()


@contextlib.contextmanager
def cancel_on_sigint(token: CancelToken, reporter: Reporter | None = None) -> Iterator[None]:
    """First Ctrl-C cancels the token (the engine stops at the next iteration); a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise KeyboardInterrupt
        token.cancel()
        msg = "cloak: interrupted; stopping (Ctrl-C again to abort immediately)"
        if reporter is not None:
            reporter.message(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
