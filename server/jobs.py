"""Job records: what the RPC threads see of a job (its state, the latest events and, when done, the output PCM).

Streams subscribe to a record; a new subscriber first gets a snapshot (accepted, queued or started, the latest
progress, the result or the error), then live events. Progress is coalesced per subscriber, so a slow client never
holds the scheduler up. Events are server.events' (plain Python); the servicer translates them for the wire.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque

import numpy as np

from cloak import CancelToken, Progress
from cloak.protect import ProtectionJob

from .events import (
    TERMINAL,
    Accepted,
    Done,
    Ended,
    ErrorKind,
    Event,
    JobState,
    JobStatus,
    ProgressEvent,
    Queued,
    Started,
    Succeeded,
)
from .upload import Upload


class Subscription:
    """One stream's view of a job: a queue of events, progress coalesced."""

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._cond = threading.Condition()

    def put(self, item: Event) -> None:
        with self._cond:
            if isinstance(item, ProgressEvent) and self._items and isinstance(self._items[-1], ProgressEvent):
                self._items[-1] = item
            else:
                self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float) -> Event | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None


class JobRecord:
    def __init__(self, upload: Upload, samples: np.ndarray, client: str, keep_on_disconnect: bool = False,
                 peer: str = "", owner: str | None = None, client_name: str = "",
                 estimated_seconds: float | None = None) -> None:
        self.id = secrets.token_urlsafe(12)
        self.estimated_seconds = estimated_seconds  # Scheduler.estimate() when the header arrived
        self.upload = upload
        self.config = upload.config
        self.samples: np.ndarray | None = samples
        self.client = client  # the fair-share identity: owner, else the peer's host
        self.owner = owner  # the token name (--tokens-file): only it may Attach, Cancel or GetJob this job
        self.client_name = client_name  # self-declared, for logs only
        self.mem = 0  # bytes of the memory budget this job holds (its peak estimate; then its kept result)
        self.peer = peer
        self.keep_on_disconnect = keep_on_disconnect
        self.state = JobState.QUEUED
        self.cancel = CancelToken()
        self.cancel_status: tuple[ErrorKind, str] = (ErrorKind.CANCELLED, "cancelled")
        self.job: ProtectionJob | None = None
        self.accepted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.queue_position = 0
        self.fraction = 0.0
        self.iterations_done = 0
        self.attaches = 0
        self.accepted_event: Accepted | None = None
        self.queued_event: Queued | None = None
        self.started_event: Started | None = None
        self.progress_event: ProgressEvent | None = None
        self.result: Succeeded | None = None
        self.error: Ended | None = None
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        windows, window = upload.plan_size()
        self.total_iterations = windows * self.config.iterations
        self.unit = self.config.repeats * window  # cost of one iteration, in "units" (for estimates)

    @property
    def result_pcm(self) -> bytes | None:
        return self.result.pcm if self.result is not None else None

    @property
    def done(self) -> Done | None:
        return self.result.done if self.result is not None else None

    # --- state changes, each atomic with the snapshot new subscribers get -------------------------------
    def _publish(self, item: Event) -> None:
        for s in self._subs:
            s.put(item)

    def set_accepted(self, position: int) -> None:
        with self._lock:
            self.queue_position = position
            self.accepted_event = Accepted(position, self.upload.frames, self.upload.sample_rate,
                                           self.upload.channels, self.estimated_seconds)
            self._publish(self.accepted_event)

    def set_queued(self, position: int, models_loading: bool) -> None:
        with self._lock:
            if self.state != JobState.QUEUED:
                return
            old = self.queued_event
            if old is not None and old.position == position and old.models_loading == models_loading:
                return
            if old is None and position == self.queue_position and not models_loading:
                return  # the accepted event already said so
            self.queue_position = position
            self.queued_event = Queued(position, models_loading)
            self._publish(self.queued_event)

    def set_started(self, windows: int) -> None:
        with self._lock:
            self.state = JobState.RUNNING
            self.queue_position = 0
            self.total_iterations = windows * self.config.iterations
            self.started_event = Started(windows, self.config.iterations,
                                         (self.started_at or time.monotonic()) - self.accepted_at)
            self._publish(self.started_event)

    def on_progress(self, p: Progress) -> None:
        with self._lock:
            self.fraction = p.fraction
            self.iterations_done += 1
            self.progress_event = ProgressEvent(p.window, p.windows, p.iteration, p.iterations,
                                                {k: float(v) for k, v in p.losses.items()}, p.elapsed_s, p.eta_s,
                                                p.fraction)
            self._publish(self.progress_event)

    def attach(self, job: ProtectionJob) -> bool:
        """Hold the started job, whose validated copy of the audio replaces the upload's, unless the record ended
        meanwhile (a cancel from another thread): then nothing is kept and False comes back. Under the lock, so a
        cancel cannot fall between the two assignments and leave the audio held by an ended record."""
        with self._lock:
            if self.state in TERMINAL:
                return False
            self.job = job
            self.samples = job.samples
            return True

    def set_succeeded(self, result_pcm: bytes, done: Done) -> None:
        with self._lock:
            self.state = JobState.SUCCEEDED
            self.fraction = 1.0
            self.result = Succeeded(result_pcm, done)
            self.finished_at = time.monotonic()
            self.job = None
            self.samples = None
            self._publish(self.result)

    def set_ended(self, state: JobState, kind: ErrorKind, message: str) -> None:
        with self._lock:
            if self.state in TERMINAL:
                return
            self.state = state
            self.error = Ended(state, kind, message)
            self.finished_at = time.monotonic()
            self.job = None
            self.samples = None
            self._publish(self.error)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    # --- streams ---------------------------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        s = Subscription()
        with self._lock:
            if self.accepted_event is not None:
                s.put(self.accepted_event)
            if self.queued_event is not None:  # the lifecycle so far, also when the job has started meanwhile
                s.put(self.queued_event)
            if self.state != JobState.QUEUED:
                for ev in (self.started_event, self.progress_event):
                    if ev is not None:
                        s.put(ev)
            if self.result is not None:
                s.put(self.result)
            elif self.error is not None:
                s.put(self.error)
            self._subs.append(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        with self._lock:
            if s in self._subs:
                self._subs.remove(s)

    def status(self, ttl: float) -> JobStatus:
        with self._lock:
            expires = None
            if self.finished_at is not None:
                expires = max(0.0, self.finished_at + ttl - time.monotonic())
            return JobStatus(self.id, self.state, self.queue_position, self.fraction,
                             self.error.message if self.error else "", expires)

    def remaining_units(self) -> float:
        return max(0, self.total_iterations - self.iterations_done) * self.unit
