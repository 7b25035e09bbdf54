"""`cloak audacity watch`: cloak the ranges marked by the "Cloak selection" macro.

Every ``interval`` seconds the watcher reads the project's labels (``GetInfo: Type=Labels``). A label whose text
starts with ``cloak:pending`` (see :mod:`clients.audacity.macro`) is a job: its text is set to ``cloak:working``,
the range is cloaked with :meth:`Bridge.cloak_range` on the tracks the macro recorded (a hand-typed
``cloak:pending`` label: every wave track with audio there), and the text becomes ``cloak:done`` or
``cloak:failed: <reason>``. A ``cloak:working`` label left by an interrupted watcher is not picked up again (run the
macro again on that range).

Each SetLabel is an undo step of its own in Audacity 3.2 ("working", then "done" right before the job's Paste, or
"failed"), so Edit > Undo first takes the cloaked audio back, then the label texts; undoing back to
``cloak:pending`` queues the range again. The watcher remembers its failures for the session and restores their
text instead of retrying them (run the macro again to retry a range).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bridge import Bridge
from .errors import (
    AudacityError,
    AudacityGone,
    BridgeCancelled,
    NoProject,
    PipeBusy,
    PipeNotFound,
    PipeTimeout,
    SelectionError,
)
from .macro import DONE, PENDING, WORKING, failed_text, parse_mark
from .outcome import CloakOutcome

__all__ = ["JobReport", "Watcher"]


@dataclass
class _Label:
    index: int  # SetLabel's global index
    track: int
    start: float
    end: float
    text: str


@dataclass
class JobReport:
    label: str
    start: float
    end: float
    ok: bool
    error: str | None = None
    outcome: CloakOutcome | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "start": self.start, "end": self.end, "ok": self.ok,
                             "error": self.error, "seconds": self.seconds}
        if self.outcome is not None:
            d.update(mode=self.outcome.mode, tracks=[t.to_dict() for t in self.outcome.tracks],
                     skipped=self.outcome.skipped, warnings=self.outcome.warnings)
        return d


def _close(a: float, b: float) -> bool:
    """Equal within GetInfo's ~6 significant digits."""
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b)) + 1e-6


@dataclass
class Watcher:
    bridge: Bridge
    interval: float = 1.0
    log: Callable[[str], None] = lambda msg: None
    report: Callable[[JobReport], None] = lambda r: None
    stop: threading.Event = field(default_factory=threading.Event)
    failed: dict[tuple[int, float, float], str] = field(default_factory=dict)
    lock: Any = None  # a PipeLock: then the pipe is locked and connected only while polling / working
    jobs_done: int = 0
    jobs_failed: int = 0

    # ------------------------------------------------------------------------------------- labels
    def _labels(self) -> list[_Label]:
        return [_Label(i, t, s, e, text) for i, (t, s, e, text) in enumerate(self.bridge.labels())]

    @staticmethod
    def _key(lab: _Label) -> tuple[int, float, float]:
        return (lab.track, round(lab.start, 4), round(lab.end, 4))

    def _find(self, like: _Label, texts: tuple[str, ...]) -> _Label | None:
        """The label `like` refers to, now (indices move when labels are added before it)."""
        for lab in self._labels():
            if lab.track == like.track and _close(lab.start, like.start) and _close(lab.end, like.end) and \
                    (lab.text in texts or lab.text.startswith(PENDING)):
                return lab
        return None

    def _set_text(self, like: _Label, text: str, texts: tuple[str, ...]) -> None:
        lab = self._find(like, texts)
        if lab is not None and lab.text != text:
            self.bridge.c.do("SetLabel", Label=lab.index, Text=text.replace('"', "'"))

    def pending(self) -> list[_Label]:
        """Jobs to do now; labels of remembered failures get their failure text back instead."""
        out = []
        for lab in self._labels():
            if not lab.text.startswith(PENDING):
                continue
            remembered = self.failed.get(self._key(lab))
            if remembered is not None:
                with contextlib.suppress(AudacityError):
                    self.bridge.c.do("SetLabel", Label=lab.index, Text=remembered)
                continue
            out.append(lab)
        return out

    # ------------------------------------------------------------------------------------- one job
    def _reapply_failures(self) -> None:
        for lab in self._labels():
            remembered = self.failed.get(self._key(lab))
            if remembered is not None and lab.text != remembered:
                self.bridge.c.do("SetLabel", Label=lab.index, Text=remembered)

    def process(self, lab: _Label) -> JobReport:
        mark = parse_mark(lab.text)
        start, end = lab.start, lab.end
        tracks = None
        original = lab.text
        if mark is not None:
            tracks = list(mark.tracks) if mark.tracks else None
            if mark.start is not None and mark.end is not None and _close(mark.start, lab.start) and \
                    _close(mark.end, lab.end):
                start, end = mark.start, mark.end  # the label was not moved: use the exact times
        texts = (original, WORKING)
        self.log(f"job: {start:.6f}-{end:.6f} s" + (f" on track(s) {tracks}" if tracks else " on all audio tracks"))
        t = time.monotonic()
        self._set_text(lab, WORKING, texts)

        def before_paste() -> None:
            self._set_text(lab, DONE, texts)
            self._reapply_failures()

        self.bridge.before_paste = before_paste
        try:
            outcome = self.bridge.cloak_range(start, end, tracks)
        except BridgeCancelled:
            with contextlib.suppress(AudacityError):
                self._set_text(lab, original, texts)
            raise
        except (PipeTimeout, NoProject, AudacityGone, PipeNotFound, PipeBusy):
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one job is reported in its label
            if self.bridge.cancelled():  # Ctrl-C while cloaking: the mark stays for the next run
                with contextlib.suppress(AudacityError):
                    self._set_text(lab, original, texts)
                raise
            reason = str(e) if isinstance(e, AudacityError | ValueError | OSError) else f"{type(e).__name__}: {e}"
            reason = reason.replace(" (the project was left as it was)", "")
            text = failed_text(reason)
            self.failed[self._key(lab)] = text
            with contextlib.suppress(AudacityError):
                self._set_text(lab, text, texts)
            self.jobs_failed += 1
            level = "cannot cloak" if isinstance(e, SelectionError) else "failed"
            self.log(f"job {level}: {reason}")
            return JobReport(original, start, end, False, reason, None, time.monotonic() - t)
        finally:
            self.bridge.before_paste = None
        with contextlib.suppress(AudacityError):  # normally already done right before the Paste
            self._set_text(lab, DONE, texts)
        self.jobs_done += 1
        return JobReport(original, start, end, True, None, outcome, time.monotonic() - t)

    # ------------------------------------------------------------------------------------- loop
    def poll_once(self) -> list[JobReport]:
        """Do every job that is pending now (labels are re-read after each job)."""
        reports: list[JobReport] = []
        seen: set[tuple[int, float, float]] = set()
        while not self.stop.is_set() and not self.bridge.cancelled():
            todo = [lab for lab in self.pending() if self._key(lab) not in seen]
            if not todo:
                break
            lab = todo[0]
            seen.add(self._key(lab))
            r = self.process(lab)
            reports.append(r)
            self.report(r)
        return reports

    def run(self, once: bool = False, reconnect: bool = True) -> int:
        """Poll until stopped (or, with once, until nothing is pending). Returns the number of failed jobs.

        With a lock, the pipe is locked and connected only while polling and working, so that a one-shot
        `cloak-selection` can run in between. After a timeout (a dialog blocks Audacity) the connection and the lock
        are kept: the late reply must be read on that connection, not by the next one."""
        waiting: str | None = None
        held = False

        def let_go() -> None:
            nonlocal held
            self.bridge.c.close()
            if held:
                self.lock.release()
                held = False

        try:
            while not self.stop.is_set() and not self.bridge.cancelled():
                try:
                    if self.lock is not None and not held:
                        self.lock.acquire(cancelled=lambda: self.stop.is_set() or self.bridge.cancelled())
                        held = True
                    self.bridge.c.connect()
                    self.poll_once()
                    if self.lock is not None:
                        let_go()
                    if waiting:
                        self.log("Audacity is answering again")
                        waiting = None
                    if once:
                        break
                except NoProject as e:
                    if self.lock is not None:
                        let_go()
                    if once:
                        raise
                    if waiting != "project":
                        self.log(f"waiting: {e}")
                        waiting = "project"
                except PipeTimeout as e:
                    if once:
                        raise
                    if waiting != "busy":
                        self.log(f"waiting: {e}")
                        waiting = "busy"
                except (AudacityGone, PipeNotFound, PipeBusy) as e:
                    let_go()
                    if isinstance(e, PipeBusy) and (self.stop.is_set() or self.bridge.cancelled()):
                        break
                    if once or not reconnect:
                        raise
                    if waiting != "gone":
                        self.log(f"waiting for Audacity: {e}")
                        waiting = "gone"
                self.stop.wait(self.interval)
        finally:
            let_go()
        return self.jobs_failed
