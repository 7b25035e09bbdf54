"""Jobs, the fair bounded queue and the scheduler thread that owns the models.

One scheduler thread does all model work. Each tick it admits queued jobs (round-robin between clients) until
`max_batch` are active, drops cancelled ones, prepares each job's window and groups the jobs with
`cloak.protect.step_groups` (jobs whose current windows have equal shapes) and runs ONE PGD iteration per
group with `cloak.protect.pgd_step` - one batched U-Net
call for up to `max_batch` jobs. So a cancelled or disconnected job leaves the active set within one iteration, and
`max_batch=1` turns cross-job batching off.

A JobRecord is what the RPC threads see: its state, the latest events and, when done, the output PCM. Streams
subscribe to it; a new subscriber first gets a snapshot (accepted, queued or started, the latest progress, the
result or the error), then live events. Progress is coalesced per subscriber, so a slow client never holds the
scheduler up. Finished records are kept for `result_ttl` seconds (bounded in count and bytes) for re-attach.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from cloak import BundleError, CancelToken, Progress
from cloak.bundle import Models
from cloak.features import DIFFVC_HOP, DIFFVC_RATE
from cloak.protect import ProtectionJob, pgd_step, step_groups

from . import codec, logs, memory, wire
from .config import ServerConfig
from .gen import cloak_service_pb2 as pb
from .guard import StepGuard
from .metrics import Metrics
from .upload import Upload

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the job queue is full ({depth} jobs waiting); retry in about {retry_after:.0f} s")
        self.depth = depth
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is draining (or failed to load its models): no new jobs."""


class Subscription:
    """One stream's view of a job: a queue of items, progress coalesced."""

    def __init__(self) -> None:
        self._items: deque[tuple[str, Any]] = deque()
        self._cond = threading.Condition()

    def put(self, item: tuple[str, Any]) -> None:
        with self._cond:
            if item[0] == "progress" and self._items and self._items[-1][0] == "progress":
                self._items[-1] = item
            else:
                self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float) -> tuple[str, Any] | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None


def window_plan_size(frames: int, sample_rate: int, window_seconds: float, overlap_seconds: float) -> tuple[int, int]:
    """(windows, samples per window at 22.05 kHz) that ProtectionJob will use (for estimates only)."""
    n22 = math.ceil(frames * DIFFVC_RATE / sample_rate)
    window = max(DIFFVC_HOP * 32, int(window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)
    if n22 <= window:
        return 1, max(n22, DIFFVC_HOP * 16)
    overlap = int(overlap_seconds * DIFFVC_RATE)
    return math.ceil((n22 - overlap) / (window - overlap)), window


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
        self.state = pb.JOB_STATE_QUEUED
        self.cancel = CancelToken()
        self.cancel_status: tuple[grpc.StatusCode, str] = (grpc.StatusCode.CANCELLED, "cancelled")
        self.job: ProtectionJob | None = None
        self.accepted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.queue_position = 0
        self.fraction = 0.0
        self.iterations_done = 0
        self.attaches = 0
        self.accepted_event: pb.JobEvent | None = None
        self.queued_event: pb.JobEvent | None = None
        self.started_event: pb.JobEvent | None = None
        self.progress_event: pb.JobEvent | None = None
        self.done_event: pb.JobEvent | None = None
        self.result_pcm: bytes | None = None
        self.error: tuple[grpc.StatusCode, str] | None = None
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        windows, window = window_plan_size(upload.frames, upload.sample_rate, self.config.window_seconds,
                                           self.config.overlap_seconds)
        self.total_iterations = windows * self.config.iterations
        self.unit = self.config.repeats * window  # cost of one iteration, in "units" (for estimates)

    # --- state changes, each atomic with the snapshot new subscribers get -------------------------------
    def _event(self, **kind: Any) -> pb.JobEvent:
        return pb.JobEvent(job_id=self.id, **kind)

    def _publish(self, item: tuple[str, Any]) -> None:
        for s in self._subs:
            s.put(item)

    def set_accepted(self, position: int) -> None:
        with self._lock:
            self.queue_position = position
            self.accepted_event = self._event(accepted=pb.Accepted(
                queue_position=position, frames=self.upload.frames, sample_rate=self.upload.sample_rate,
                channels=self.upload.channels, estimated_seconds=self.estimated_seconds))
            self._publish(("event", self.accepted_event))

    def set_queued(self, position: int, models_loading: bool) -> None:
        with self._lock:
            if self.state != pb.JOB_STATE_QUEUED:
                return
            old = self.queued_event.queued if self.queued_event is not None else None
            if old is not None and old.queue_position == position and old.models_loading == models_loading:
                return
            if old is None and position == self.queue_position and not models_loading:
                return  # the accepted event already said so
            self.queue_position = position
            self.queued_event = self._event(queued=pb.Queued(queue_position=position, models_loading=models_loading))
            self._publish(("event", self.queued_event))

    def set_started(self, windows: int) -> None:
        with self._lock:
            self.state = pb.JOB_STATE_RUNNING
            self.queue_position = 0
            self.total_iterations = windows * self.config.iterations
            self.started_event = self._event(started=pb.Started(
                windows=windows, iterations=self.config.iterations,
                queued_seconds=(self.started_at or time.monotonic()) - self.accepted_at))
            self._publish(("event", self.started_event))

    def on_progress(self, p: Progress) -> None:
        with self._lock:
            self.fraction = p.fraction
            self.iterations_done += 1
            self.progress_event = self._event(progress=pb.JobProgress(
                window=p.window, windows=p.windows, iteration=p.iteration, iterations=p.iterations,
                losses={k: float(v) for k, v in p.losses.items()}, elapsed_seconds=p.elapsed_s, eta_seconds=p.eta_s,
                fraction=p.fraction))
            self._publish(("progress", self.progress_event))

    def set_succeeded(self, result_pcm: bytes, done: pb.Done) -> None:
        with self._lock:
            self.state = pb.JOB_STATE_SUCCEEDED
            self.fraction = 1.0
            self.result_pcm = result_pcm
            self.done_event = self._event(done=done)
            self.finished_at = time.monotonic()
            self.job = None
            self.samples = None
            self._publish(("result", None))

    def set_ended(self, state: int, code: grpc.StatusCode, message: str) -> None:
        with self._lock:
            if self.state in TERMINAL:
                return
            self.state = state
            self.error = (code, message)
            self.finished_at = time.monotonic()
            self.job = None
            self.samples = None
            self._publish(("error", self.error))

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    # --- streams ---------------------------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        s = Subscription()
        with self._lock:
            if self.accepted_event is not None:
                s.put(("event", self.accepted_event))
            if self.queued_event is not None:  # the lifecycle so far, also when the job has started meanwhile
                s.put(("event", self.queued_event))
            if self.state != pb.JOB_STATE_QUEUED:
                for ev in (self.started_event, self.progress_event):
                    if ev is not None:
                        s.put(("event", ev))
            if self.state == pb.JOB_STATE_SUCCEEDED:
                s.put(("result", None))
            elif self.error is not None:
                s.put(("error", self.error))
            self._subs.append(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        with self._lock:
            if s in self._subs:
                self._subs.remove(s)

    def status(self, ttl: float) -> pb.JobStatus:
        with self._lock:
            st = pb.JobStatus(job_id=self.id, state=self.state, queue_position=self.queue_position,
                              fraction=self.fraction, error=self.error[1] if self.error else "")
            if self.finished_at is not None:
                st.expires_in_seconds = max(0.0, self.finished_at + ttl - time.monotonic())
            return st

    def remaining_units(self) -> float:
        return max(0, self.total_iterations - self.iterations_done) * self.unit


class FairQueue:
    """Round-robin between clients: each client's jobs are FIFO; the client served last goes to the back."""

    def __init__(self) -> None:
        self._q: OrderedDict[str, deque[JobRecord]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(d) for d in self._q.values())

    def push(self, rec: JobRecord) -> None:
        self._q.setdefault(rec.client, deque()).append(rec)

    def clients(self) -> list[str]:
        return list(self._q)

    def pop(self, prefer: Callable[[str], bool] | None = None) -> JobRecord | None:
        """The next job: from the first client in turn for whom `prefer` holds, else from the first in turn."""
        if not self._q:
            return None
        client = next((c for c in self._q if prefer(c)), None) if prefer is not None else None
        if client is None:
            client = next(iter(self._q))
        dq = self._q[client]
        rec = dq.popleft()
        del self._q[client]
        if dq:
            self._q[client] = dq
        return rec

    def remove(self, rec: JobRecord) -> bool:
        dq = self._q.get(rec.client)
        if dq is None or rec not in dq:
            return False
        dq.remove(rec)
        if not dq:
            del self._q[rec.client]
        return True

    def order(self) -> list[JobRecord]:
        """Jobs in the order they will start."""
        lanes = [list(d) for d in self._q.values()]
        out: list[JobRecord] = []
        for i in range(max((len(lane) for lane in lanes), default=0)):
            out += [lane[i] for lane in lanes if i < len(lane)]
        return out

    def drain(self) -> list[JobRecord]:
        out = self.order()
        self._q.clear()
        return out


class Scheduler:
    def __init__(self, config: ServerConfig, metrics: Metrics, models: Models | None = None) -> None:
        self.cfg = config
        self.metrics = metrics
        self.models = models
        self.load_error: str | None = None
        self.serving_state = pb.SERVING_STATE_SERVING if models is not None else pb.SERVING_STATE_LOADING
        self.cond = threading.Condition()
        self.queue = FairQueue()
        self.active: list[JobRecord] = []
        self.parked: list[JobRecord] = []  # running jobs paused for another identity's fair share
        self.reserved = 0
        self.jobs: dict[str, JobRecord] = {}
        self.finished: OrderedDict[str, JobRecord] = OrderedDict()
        self.sec_per_unit: float | None = None
        self.on_state: Callable[[int], None] | None = None  # health updates
        self.memory = memory.MemoryBudget(config.memory_budget_bytes)
        self.guard = StepGuard()  # cancellation between U-Net blocks, not only between iterations
        if models is not None:
            self.guard.install(models)
        metrics.memory_budget.set(self.memory.total)
        self.stats = {"steps": 0, "job_iterations": 0, "max_batch_seen": 0, "succeeded": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cloak-scheduler", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def load(self, loader: Callable[[], Models]) -> threading.Thread:
        """Load the models in a background thread (jobs queue meanwhile); health turns SERVING when done."""
        def run() -> None:
            t0 = time.monotonic()
            try:
                models = loader()
            except Exception as e:  # noqa: BLE001 - reported, and the server stops
                self.load_error = f"{type(e).__name__}: {e}"
                logs.event("models_failed", level=40, error=self.load_error)
                with self.cond:
                    self.serving_state = pb.SERVING_STATE_UNSPECIFIED
                    for rec in self.queue.drain():
                        self._end(rec, pb.JOB_STATE_FAILED, grpc.StatusCode.UNAVAILABLE,
                                  f"the server could not load its models: {self.load_error}", "failed")
                    self.cond.notify_all()
                if self.on_state:
                    self.on_state(pb.SERVING_STATE_UNSPECIFIED)
                return
            logs.event("models_loaded", seconds=round(time.monotonic() - t0, 2),
                       models=[{"name": i.name, "sha256": i.sha256, "device": i.device} for i in models.info])
            self.set_models(models)

        t = threading.Thread(target=run, name="cloak-model-loader", daemon=True)
        t.start()
        return t

    def set_models(self, models: Models) -> None:
        self.guard.install(models)
        with self.cond:
            self.models = models
            if self.serving_state == pb.SERVING_STATE_LOADING:
                self.serving_state = pb.SERVING_STATE_SERVING
            self._update_positions()
            self.cond.notify_all()
        if self.on_state:
            self.on_state(self.serving_state)

    @property
    def accepting(self) -> bool:
        return self.serving_state in (pb.SERVING_STATE_LOADING, pb.SERVING_STATE_SERVING) and not self._stop

    def drain(self, timeout: float) -> None:
        """Stop taking jobs; queued ones end UNAVAILABLE at once; running ones get `timeout` s to finish, then
        end UNAVAILABLE. Returns when no job runs."""
        with self.cond:
            self.serving_state = pb.SERVING_STATE_DRAINING
            waiting = self.queue.drain()
            for rec in waiting:
                self._end(rec, pb.JOB_STATE_FAILED, grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down and had not started this job; resubmit it", "shutdown")
            running = len(self.active) + len(self.parked)
            self.cond.notify_all()
        logs.event("draining", queued_ended=len(waiting), running=running, timeout_s=timeout)
        if self.on_state:
            self.on_state(pb.SERVING_STATE_DRAINING)
        end = time.monotonic() + timeout
        with self.cond:
            while (self.active or self.parked) and time.monotonic() < end:
                self.cond.wait(min(0.2, max(0.0, end - time.monotonic())))
            for rec in [*self.active, *self.parked]:
                rec.cancel_status = (grpc.StatusCode.UNAVAILABLE,
                                     f"the server shut down before the job finished (drain timeout {timeout:g} s)")
                rec.cancel.cancel()
            self.cond.notify_all()
            while (self.active or self.parked) and self._thread.is_alive():
                self.cond.wait(0.2)

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            for rec in self.queue.drain():
                self._end(rec, pb.JOB_STATE_FAILED, grpc.StatusCode.UNAVAILABLE, "the server stopped", "shutdown")
            for rec in [*self.active, *self.parked]:
                rec.cancel_status = (grpc.StatusCode.UNAVAILABLE, "the server stopped")
                rec.cancel.cancel()
            self.cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.guard.remove()

    # --- admission (RPC threads) -----------------------------------------------------------------------
    def reserve(self) -> None:
        """Take a queue slot for an upload about to be received; raises QueueFull or NotAccepting."""
        with self.cond:
            if not self.accepting:
                raise NotAccepting(self.not_accepting_reason())
            depth = len(self.queue) + self.reserved
            if depth >= self.cfg.max_queue:
                raise QueueFull(depth, self.retry_after())
            self.reserved += 1
            self.metrics.queue_depth.set(depth + 1)

    def release(self) -> None:
        with self.cond:
            self.reserved -= 1
            self.metrics.queue_depth.set(len(self.queue) + self.reserved)

    def submit(self, rec: JobRecord) -> None:
        """Queue a received job (its reservation becomes its queue slot)."""
        with self.cond:
            self.reserved -= 1
            if not self.accepting:
                self.metrics.queue_depth.set(len(self.queue) + self.reserved)
                raise NotAccepting(self.not_accepting_reason())
            self.jobs[rec.id] = rec
            self.queue.push(rec)
            order = self.queue.order()
            rec.set_accepted(order.index(rec) + 1)
            self._update_positions()
            self.metrics.queue_depth.set(len(self.queue) + self.reserved)
            self.cond.notify_all()
        logs.event("job_accepted", job_id=rec.id, client=rec.client, client_name=rec.client_name, peer=rec.peer,
                   frames=rec.upload.frames,
                   sample_rate=rec.upload.sample_rate, channels=rec.upload.channels,
                   encoding=rec.upload.encoding, queue_position=rec.queue_position,
                   iterations=rec.config.iterations, seed=rec.config.seed)

    def not_accepting_reason(self) -> str:
        if self.load_error:
            return f"the server could not load its models: {self.load_error}"
        return "the server is shutting down; send the job to another replica or retry later"

    def get(self, job_id: str) -> JobRecord | None:
        with self.cond:
            self._prune()
            return self.jobs.get(job_id)

    def cancel(self, job_id: str, reason: str, code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
               wait: float = 0.0) -> int:
        """Cancel a job by id (see cancel_record). Raises KeyError for an unknown id."""
        with self.cond:
            rec = self.jobs.get(job_id)
        if rec is None:
            raise KeyError(job_id)
        return self.cancel_record(rec, reason, code, wait)

    def cancel_record(self, rec: JobRecord, reason: str, code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
                      wait: float = 0.0) -> int:
        """Cancel a job: a queued one ends at once, a running one at its next check (between U-Net calls).
        Waits up to `wait` s for the job to end and returns the state it is really in then: CANCELLED, or
        SUCCEEDED/FAILED when it finished first, or RUNNING when it has not stopped yet. Works on a record that
        was pruned meanwhile (it just stays finished)."""
        with self.cond:
            if rec.finished:
                return rec.state
            if self.queue.remove(rec):
                self._end(rec, pb.JOB_STATE_CANCELLED, code, reason, "cancelled")
                self._update_positions()
                self.metrics.queue_depth.set(len(self.queue) + self.reserved)
            else:
                rec.cancel_status = (code, reason)
                rec.cancel.cancel()
            self.cond.notify_all()
            end = time.monotonic() + wait
            while not rec.finished and (left := end - time.monotonic()) > 0:
                self.cond.wait(min(left, 0.5))
            return rec.state

    def on_rpc_end(self, rec: JobRecord) -> None:
        """The job's Protect call ended: unless the client asked to keep it, a dropped call cancels the job."""
        if rec.finished or rec.keep_on_disconnect:
            return
        self.cancel_record(rec, "the client disconnected (or its deadline passed) before the job finished")
        logs.event("job_disconnected", job_id=rec.id, client=rec.client)

    # --- estimates ---------------------------------------------------------------------------------------
    def estimate(self, upload: Upload) -> float | None:
        """Seconds a new job would take if it ran alone from now (None before any step was measured). The
        server refuses a job whose deadline is sooner: it could not finish even without waiting."""
        spu = self.sec_per_unit
        if spu is None:
            return None
        windows, window = window_plan_size(upload.frames, upload.sample_rate, upload.config.window_seconds,
                                           upload.config.overlap_seconds)
        return windows * upload.config.iterations * upload.config.repeats * window * spu

    def backlog_seconds(self) -> float | None:
        """Seconds of work already here (running, paused and queued jobs) at the measured speed; None with
        estimate()."""
        spu = self.sec_per_unit
        if spu is None:
            return None
        with self.cond:
            units = sum(r.remaining_units() for r in [*self.active, *self.parked, *self.queue.order()])
        return units * spu

    def retry_after(self) -> float:
        """Seconds until a queue slot is likely to free (the RESOURCE_EXHAUSTED hint)."""
        spu = self.sec_per_unit
        if spu is None or not self.active:
            return 5.0
        soonest = min(r.remaining_units() for r in self.active) * spu
        return float(min(600.0, max(1.0, soonest)))

    # --- the scheduler thread ----------------------------------------------------------------------------
    def _update_positions(self) -> None:
        loading = self.models is None
        for i, rec in enumerate(self.queue.order()):
            rec.set_queued(i + 1, loading)

    def _loop(self) -> None:
        while True:
            with self.cond:
                self._prune()
                if self._stop and not self.active:
                    for rec in list(self.parked):  # paused jobs are cancelled by stop(): end them here
                        self.parked.remove(rec)
                        self._end_cancelled(rec)
                    return
                admitted: list[JobRecord] = []
                if self.models is not None and not self._stop:
                    self._rebalance()
                    while len(self.active) < self.cfg.max_batch:
                        rec = self.queue.pop(self._under_share())
                        if rec is None:
                            break
                        rec.started_at = time.monotonic()
                        self.active.append(rec)
                        admitted.append(rec)
                    if admitted:
                        self._update_positions()
                        self.metrics.queue_depth.set(len(self.queue) + self.reserved)
                        self.metrics.active_jobs.set(len(self.active))
                if not self.active:
                    self.cond.wait(0.5)
                    continue
                active = list(self.active)
            try:
                for rec in admitted:
                    self._start(rec)
                self._tick([r for r in active if not r.finished])
            except Exception as e:  # noqa: BLE001 - a bug here must not take the server down
                logs.event("scheduler_error", level=40, exc_info=True, error=f"{type(e).__name__}: {e}")
                for rec in active:
                    if not rec.finished:
                        self._fail(rec, grpc.StatusCode.INTERNAL, f"scheduler error: {type(e).__name__}: {e}")

    def _share(self) -> tuple[dict[str, int], int]:
        """(running slots per identity, the fair share): ceil(max_batch / identities with running, paused or
        waiting jobs)."""
        counts: dict[str, int] = {}
        for r in self.active:
            counts[r.client] = counts.get(r.client, 0) + 1
        identities = set(counts) | set(self.queue.clients()) | {r.client for r in self.parked}
        return counts, math.ceil(self.cfg.max_batch / max(1, len(identities)))

    def _under_share(self) -> Callable[[str], bool]:
        """Identities below their share start first; one above it gets a free slot only when nobody else
        waits."""
        counts, share = self._share()
        return lambda client: counts.get(client, 0) < share

    def _rebalance(self) -> None:
        """Fair share while others wait (caller holds self.cond): paused jobs that were cancelled end; a paused
        job resumes when a slot is free and its identity is below its share (or nobody below theirs waits);
        when every slot is taken and an identity below its share waits, a job of the identity furthest above
        its share is paused (it keeps its state and memory, and resumes later where it stopped)."""
        for rec in [r for r in self.parked if r.cancel.cancelled]:
            self.parked.remove(rec)
            self._end_cancelled(rec)
        for rec in list(self.parked):
            if len(self.active) >= self.cfg.max_batch:
                break
            waiting_under = any(self._under_share()(c) for c in self.queue.clients())
            if self._under_share()(rec.client) or not waiting_under:
                self.parked.remove(rec)
                self.active.append(rec)
                logs.event("job_resumed", job_id=rec.id, client=rec.client)
        while len(self.active) >= self.cfg.max_batch:
            counts, share = self._share()
            if not any(counts.get(c, 0) < share for c in self.queue.clients()):
                break
            over = max(counts, key=lambda c: counts[c])
            if counts[over] <= share:
                break
            candidates = [r for r in self.active if r.client == over and r.job is not None and not r.finished]
            if not candidates:
                break
            victim = max(candidates, key=lambda r: r.started_at or 0.0)  # the latest started yields first
            self.active.remove(victim)
            self.parked.append(victim)
            logs.event("job_paused", job_id=victim.id, client=victim.client, share=share,
                       reason="another identity below its fair share of the running slots waits")

    def _start(self, rec: JobRecord) -> None:
        assert self.models is not None and rec.samples is not None
        try:
            self.models.speaker_encoders(rec.config.id_encoders)  # raises BundleError for a missing WavLM
            rec.job = ProtectionJob(rec.samples, rec.upload.sample_rate, self.models, rec.config,
                                    progress=rec.on_progress, cancel=rec.cancel)
            rec.samples = rec.job.samples  # the job's validated copy is the same audio: keep one
            if rec.config.iterations == 0:  # as cloak.protect does: no PGD, windows finished unperturbed
                with self.guard.watching([rec]):
                    rec.job.finish_unperturbed()
        except Exception as e:  # noqa: BLE001 - sorted out below
            if self.guard.tripped or rec.cancel.cancelled:
                self._end_cancelled(rec)
                return
            self._start_failed(rec, e)
            return
        self.metrics.queue_wait.observe(rec.started_at - rec.accepted_at)
        rec.set_started(len(rec.job.plan))
        logs.event("job_started", job_id=rec.id, client=rec.client, windows=len(rec.job.plan),
                   queued_s=round(rec.started_at - rec.accepted_at, 3))

    def _start_failed(self, rec: JobRecord, e: Exception) -> None:
        """One job's failure to start must not stop the server."""
        if isinstance(e, BundleError):
            self._fail(rec, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        else:
            self._fail(rec, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", exc=True)

    def _tick(self, active: list[JobRecord]) -> None:
        runnable: list[JobRecord] = []
        for rec in active:
            if rec.finished or rec.job is None:
                continue
            if rec.cancel.cancelled:
                self._end_cancelled(rec)
                continue
            if rec.job.done:
                self._complete(rec)
                continue
            runnable.append(rec)
        prepared: dict[int, JobRecord] = {}  # id(job) -> its record
        for rec in runnable:
            try:
                with self.guard.watching([rec]):  # a window's set-up runs the U-Net pool/repeats times
                    rec.job.prepare()
            except Exception as e:  # noqa: BLE001 - e.g. out of memory while preparing a window
                if self.guard.tripped:
                    self._end_cancelled(rec)
                else:
                    self._fail(rec, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
                continue
            prepared[id(rec.job)] = rec
        jobs = [rec.job for rec in prepared.values() if rec.job is not None]
        for batch in step_groups(jobs, self.cfg.max_batch):
            self._step([prepared[id(job)] for job in batch])
        for rec in runnable:
            if not rec.finished and rec.job is not None and rec.job.done:
                if rec.cancel.cancelled:  # cancelled during its last step: it must not be delivered
                    self._end_cancelled(rec)
                else:
                    self._complete(rec)

    def _end_cancelled(self, rec: JobRecord) -> None:
        code, reason = rec.cancel_status
        outcome = "cancelled" if code == grpc.StatusCode.CANCELLED else "shutdown"
        state = pb.JOB_STATE_CANCELLED if code == grpc.StatusCode.CANCELLED else pb.JOB_STATE_FAILED
        with self.cond:
            self._end(rec, state, code, reason, outcome)

    def _step(self, recs: list[JobRecord]) -> None:
        t0 = time.perf_counter()
        try:
            with self.guard.watching(recs):
                pgd_step([r.job for r in recs])
        except Exception as e:  # noqa: BLE001
            if self.guard.tripped:  # all its jobs were cancelled mid-step: the next tick ends them
                logs.event("step_abandoned", jobs=[r.id for r in recs], seconds=round(time.perf_counter() - t0, 3))
                return
            if len(recs) > 1:  # maybe the batch was too big (memory): step them one by one
                logs.event("batch_failed", level=30, jobs=[r.id for r in recs], error=f"{type(e).__name__}: {e}")
                for r in recs:
                    self._step([r])
            else:
                self._fail(recs[0], grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
            return
        dt = time.perf_counter() - t0
        units = sum(r.unit for r in recs)
        spu = dt / max(units, 1)
        self.sec_per_unit = spu if self.sec_per_unit is None else 0.7 * self.sec_per_unit + 0.3 * spu
        self.stats["steps"] += 1
        self.stats["job_iterations"] += len(recs)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(recs))
        self.metrics.steps.inc()
        self.metrics.iterations.inc(len(recs))
        self.metrics.batch_size.observe(len(recs))

    def _complete(self, rec: JobRecord) -> None:
        assert rec.job is not None and rec.samples is not None
        try:
            res = rec.job.result()
            up = rec.upload
            out = codec.encode(res.audio, up.encoding, reference=rec.samples, epsilon=rec.config.epsilon)
            m = res.metrics
            queued = (rec.started_at or rec.accepted_at) - rec.accepted_at
            linf = codec.delivered_linf(out, up.encoding, rec.samples)
            warning = unprotected_warning(linf, rec.samples)
            snr = 0.0 if warning else float(m["snr_db"])
            details = {k: v for k, v in m.items() if k in ("history", "config", "snr_db", "linf")}
            if warning:
                details["snr_db"] = None
                details["warning"] = warning
            metrics = pb.JobMetrics(
                snr_db=snr, linf=linf, warning=warning, losses_start=m["losses_start"],
                losses_end=m["losses_end"], iterations=int(m["iterations"]), windows=int(m["windows"]),
                seconds=time.monotonic() - (rec.started_at or rec.accepted_at), queued_seconds=queued,
                gender=str(m.get("gender", "")), opposite_speaker=str(m.get("opposite_speaker", "")),
                model=str(m.get("model", "")), settings=wire.config_to_settings(rec.config),
                details_json=json.dumps(details, default=_jsonable))
            done = pb.Done(sha256=codec.sha256_hex(out), frames=up.frames, encoding=wire.ENCODING_ENUM[up.encoding],
                           metrics=metrics)
        except Exception as e:  # noqa: BLE001
            self._fail(rec, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
            return
        with self.cond:
            rec.set_succeeded(out, done)
            self._retire(rec, "succeeded")
        self.stats["succeeded"] += 1
        logs.event("job_done", level=30 if warning else 20, job_id=rec.id, client=rec.client,
                   seconds=round(metrics.seconds, 3), queued_s=round(queued, 3),
                   snr_db=None if warning else round(metrics.snr_db, 2), linf=metrics.linf,
                   output_sha256=done.sha256, **({"warning": warning} if warning else {}))

    def _fail(self, rec: JobRecord, code: grpc.StatusCode, message: str, exc: bool = False) -> None:
        logs.event("job_failed", level=40, exc_info=exc, job_id=rec.id, client=rec.client, code=code.name,
                   error=message)
        with self.cond:
            self._end(rec, pb.JOB_STATE_FAILED, code, message, "failed", log=False)

    def _end(self, rec: JobRecord, state: int, code: grpc.StatusCode, message: str, outcome: str,
             log: bool = True) -> None:
        """Finish a job that did not succeed (caller holds self.cond)."""
        if rec.finished:
            return
        rec.set_ended(state, code, message)
        self._retire(rec, outcome)
        if log and outcome != "failed":
            logs.event("job_" + outcome, job_id=rec.id, client=rec.client, code=code.name, reason=message)
        if self.models is not None and self.models.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _retire(self, rec: JobRecord, outcome: str) -> None:
        if rec in self.active:
            self.active.remove(rec)
        if rec in self.parked:
            self.parked.remove(rec)
        self._give_memory(rec, rec.mem - len(rec.result_pcm or b""))  # a kept result holds its bytes
        self.jobs[rec.id] = rec
        self.finished[rec.id] = rec
        self.metrics.jobs.labels(outcome).inc()
        if rec.owner is not None:
            self.metrics.identity_jobs.labels(rec.owner, outcome).inc()
        self.metrics.job_seconds.labels(outcome).observe(time.monotonic() - rec.accepted_at)
        self.metrics.active_jobs.set(len(self.active))
        self._prune()
        self.cond.notify_all()

    def _prune(self, need_memory: int = 0) -> None:
        """Drop finished jobs past their TTL or over the count/size caps, and (oldest first) as many more as
        `need_memory` bytes of the budget need: kept results are a cache, new work comes first."""
        now = time.monotonic()
        total = sum(len(r.result_pcm or b"") for r in self.finished.values())
        while self.finished:
            rid, rec = next(iter(self.finished.items()))
            expired = rec.finished_at is not None and now - rec.finished_at > self.cfg.result_ttl
            if not (expired or len(self.finished) > self.cfg.max_results
                    or total > self.cfg.max_result_mb * (1 << 20) or self.memory.free < need_memory):
                break
            del self.finished[rid]
            self.jobs.pop(rid, None)
            total -= len(rec.result_pcm or b"")
            self._give_memory(rec, rec.mem)
        self.metrics.memory_reserved.set(self.memory.used)

    # --- the memory budget (server.memory) -----------------------------------------------------------------
    def memory_estimate(self, upload: Upload) -> memory.Estimate:
        return memory.estimate(upload, memory.unet_scale(self.models))

    def take_memory(self, n: int) -> bool:
        """Hold n bytes of the budget, dropping kept results (oldest first) if that makes room."""
        with self.cond:
            if not self.memory.take(n):
                self._prune(need_memory=n)
                if not self.memory.take(n):
                    return False
            self.metrics.memory_reserved.set(self.memory.used)
            return True

    def give_memory(self, n: int) -> None:
        self.memory.give(n)
        self.metrics.memory_reserved.set(self.memory.used)

    def _give_memory(self, rec: JobRecord, n: int) -> None:
        n = min(n, rec.mem)
        rec.mem -= n
        self.memory.give(n)

    # --- views ---------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        with self.cond:
            return {"queue_depth": len(self.queue) + self.reserved,
                    "active_jobs": len(self.active) + len(self.parked)}


def unprotected_warning(linf: float, samples: np.ndarray) -> str:
    """The JobMetrics.warning of an output that differs from its input by `linf` (as delivered): empty unless
    nothing changed, in which case the SNR would be meaningless (0 dB for silence, hundreds of dB otherwise)."""
    if linf > 0:
        return ""
    if not np.any(samples):
        return ("NOT PROTECTED: the input is silent (all samples 0), so there is no voice to protect and the output "
                "equals the input (linf 0); no SNR is reported")
    return ("NOT PROTECTED: the output equals the input (linf 0): the perturbation vanished (no loss gradient); "
            "no SNR is reported")


def _jsonable(o: Any) -> Any:
    if isinstance(o, tuple | set):
        return list(o)
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
