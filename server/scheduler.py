"""The scheduler: admission to the fair bounded queue, the thread that owns the models, and the bookkeeping of
finished jobs.

One scheduler thread does all model work (server.worker). Each tick it admits queued jobs (round-robin between
clients, server.fairqueue) until `max_batch` are active, drops cancelled ones and runs one batched PGD iteration
per group of jobs with equal window shapes. So a cancelled or disconnected job leaves the active set within one
iteration, and `max_batch=1` turns cross-job batching off.

Jobs are server.jobs' JobRecords, whose events and states are server.events' plain Python: nothing here knows
protobuf or gRPC. Finished records are kept for `result_ttl` seconds (bounded in count and bytes) for re-attach.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cloak.bundle import Models
from cloak.footprint import activation_scale

from . import logs, memory
from .config import ServerConfig
from .events import Done, ErrorKind, JobState, ServingState
from .fairqueue import FairQueue, fair_share
from .guard import StepGuard
from .jobs import JobRecord
from .metrics import Metrics
from .upload import Upload
from .worker import Worker


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the job queue is full ({depth} jobs waiting); retry in about {retry_after:.0f} s")
        self.depth = depth
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is draining (or failed to load its models): no new jobs."""


class Scheduler:
    def __init__(self, config: ServerConfig, metrics: Metrics, models: Models | None = None) -> None:
        self.cfg = config
        self.metrics = metrics
        self.models = models
        self.load_error: str | None = None
        self.serving_state = ServingState.SERVING if models is not None else ServingState.LOADING
        self.cond = threading.Condition()
        self.queue = FairQueue()
        self.active: list[JobRecord] = []
        self.parked: list[JobRecord] = []  # running jobs paused for another identity's fair share
        self.reserved = 0
        self.jobs: dict[str, JobRecord] = {}
        self.finished: OrderedDict[str, JobRecord] = OrderedDict()
        self.on_state: Callable[[ServingState], None] | None = None  # health updates
        self.memory = memory.MemoryBudget(config.memory_budget_bytes)
        self.guard = StepGuard()  # cancellation between U-Net blocks, not only between iterations
        if models is not None:
            self.guard.install(models)
        self.worker = Worker(self, metrics, self.guard, config.max_batch)
        metrics.memory_budget.set(self.memory.total)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cloak-scheduler", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def stats(self) -> dict[str, int]:
        """Steps, job-iterations, the largest batch seen and succeeded jobs, counted by the worker."""
        return self.worker.stats

    @property
    def sec_per_unit(self) -> float | None:
        """The measured speed (seconds per unit of work), None before the first step."""
        return self.worker.sec_per_unit

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
                    self.serving_state = ServingState.FAILED
                    for rec in self.queue.drain():
                        self._end(rec, JobState.FAILED, ErrorKind.UNAVAILABLE,
                                  f"the server could not load its models: {self.load_error}", "failed")
                    self.cond.notify_all()
                if self.on_state:
                    self.on_state(ServingState.FAILED)
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
            if self.serving_state == ServingState.LOADING:
                self.serving_state = ServingState.SERVING
            self._update_positions()
            self.cond.notify_all()
        if self.on_state:
            self.on_state(self.serving_state)

    @property
    def accepting(self) -> bool:
        return self.serving_state in (ServingState.LOADING, ServingState.SERVING) and not self._stop

    def drain(self, timeout: float) -> None:
        """Stop taking jobs; queued ones end UNAVAILABLE at once; running ones get `timeout` s to finish, then
        end UNAVAILABLE. Returns when no job runs."""
        with self.cond:
            self.serving_state = ServingState.DRAINING
            waiting = self.queue.drain()
            for rec in waiting:
                self._end(rec, JobState.FAILED, ErrorKind.UNAVAILABLE,
                          "the server is shutting down and had not started this job; resubmit it", "shutdown")
            running = len(self.active) + len(self.parked)
            self.cond.notify_all()
        logs.event("draining", queued_ended=len(waiting), running=running, timeout_s=timeout)
        if self.on_state:
            self.on_state(ServingState.DRAINING)
        end = time.monotonic() + timeout
        with self.cond:
            while (self.active or self.parked) and time.monotonic() < end:
                self.cond.wait(min(0.2, max(0.0, end - time.monotonic())))
            for rec in [*self.active, *self.parked]:
                rec.cancel_status = (ErrorKind.UNAVAILABLE,
                                     f"the server shut down before the job finished (drain timeout {timeout:g} s)")
                rec.cancel.cancel()
            self.cond.notify_all()
            while (self.active or self.parked) and self._thread.is_alive():
                self.cond.wait(0.2)

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            for rec in self.queue.drain():
                self._end(rec, JobState.FAILED, ErrorKind.UNAVAILABLE, "the server stopped", "shutdown")
            for rec in [*self.active, *self.parked]:
                rec.cancel_status = (ErrorKind.UNAVAILABLE, "the server stopped")
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

    def cancel(self, job_id: str, reason: str, kind: ErrorKind = ErrorKind.CANCELLED,
               wait: float = 0.0) -> JobState:
        """Cancel a job by id (see cancel_record). Raises KeyError for an unknown id."""
        with self.cond:
            rec = self.jobs.get(job_id)
        if rec is None:
            raise KeyError(job_id)
        return self.cancel_record(rec, reason, kind, wait)

    def cancel_record(self, rec: JobRecord, reason: str, kind: ErrorKind = ErrorKind.CANCELLED,
                      wait: float = 0.0) -> JobState:
        """Cancel a job: a queued one ends at once, a running one at its next check (between U-Net calls).
        Waits up to `wait` s for the job to end and returns the state it is really in then: CANCELLED, or
        SUCCEEDED/FAILED when it finished first, or RUNNING when it has not stopped yet. Works on a record that
        was pruned meanwhile (it just stays finished)."""
        with self.cond:
            if rec.finished:
                return rec.state
            if self.queue.remove(rec):
                self._end(rec, JobState.CANCELLED, kind, reason, "cancelled")
                self._update_positions()
                self.metrics.queue_depth.set(len(self.queue) + self.reserved)
            else:
                rec.cancel_status = (kind, reason)
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
        windows, window = upload.plan_size()
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
                        self.end_cancelled(rec)
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
                    self.worker.start(rec, self.models)
                self.worker.tick([r for r in active if not r.finished])
            except Exception as e:  # noqa: BLE001 - a bug here must not take the server down
                logs.event("scheduler_error", level=40, exc_info=True, error=f"{type(e).__name__}: {e}")
                for rec in active:
                    if not rec.finished:
                        self.fail(rec, ErrorKind.INTERNAL, f"scheduler error: {type(e).__name__}: {e}")

    def _share(self) -> tuple[dict[str, int], int]:
        """(running slots per identity, the fair share): server.fairqueue.fair_share."""
        return fair_share(self.active, self.queue.clients(), self.parked, self.cfg.max_batch)

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
            self.end_cancelled(rec)
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

    # --- how jobs end (server.worker.Outcomes) ------------------------------------------------------------
    def end_cancelled(self, rec: JobRecord) -> None:
        kind, reason = rec.cancel_status
        outcome = "cancelled" if kind == ErrorKind.CANCELLED else "shutdown"
        state = JobState.CANCELLED if kind == ErrorKind.CANCELLED else JobState.FAILED
        with self.cond:
            self._end(rec, state, kind, reason, outcome)

    def succeed(self, rec: JobRecord, result_pcm: bytes, done: Done) -> None:
        with self.cond:
            rec.set_succeeded(result_pcm, done)
            self._retire(rec, "succeeded")

    def fail(self, rec: JobRecord, kind: ErrorKind, message: str, exc: bool = False) -> None:
        logs.event("job_failed", level=40, exc_info=exc, job_id=rec.id, client=rec.client, code=kind.name,
                   error=message)
        with self.cond:
            self._end(rec, JobState.FAILED, kind, message, "failed", log=False)

    def _end(self, rec: JobRecord, state: JobState, kind: ErrorKind, message: str, outcome: str,
             log: bool = True) -> None:
        """Finish a job that did not succeed (caller holds self.cond)."""
        if rec.finished:
            return
        rec.set_ended(state, kind, message)
        self._retire(rec, outcome)
        if log and outcome != "failed":
            logs.event("job_" + outcome, job_id=rec.id, client=rec.client, code=kind.name, reason=message)
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
        return memory.estimate(upload, activation_scale(self.models))

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

