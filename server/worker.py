"""The scheduler thread's model work: starting a job (its ProtectionJob), one PGD iteration per tick for the
active jobs, and the delivered result.

Each tick prepares each job's window, groups the jobs with `cloak.protect.step_groups` (jobs whose current windows
have equal shapes) and runs ONE PGD iteration per group with `cloak.protect.pgd_step` - one batched U-Net call for
up to `max_batch` jobs. How a job ends is the scheduler's bookkeeping (Outcomes).
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import numpy as np

from cloak import BundleError
from cloak.bundle import Models
from cloak.files import jsonable
from cloak.protect import ProtectionJob, pgd_step, step_groups

from . import codec, logs
from .events import Done, ErrorKind, ResultMetrics
from .guard import StepGuard
from .jobs import JobRecord
from .metrics import Metrics


class Outcomes(Protocol):
    """How jobs end (the scheduler's side: its lists, the memory budget, metrics)."""

    def end_cancelled(self, rec: JobRecord) -> None: ...

    def fail(self, rec: JobRecord, kind: ErrorKind, message: str, exc: bool = False) -> None: ...

    def succeed(self, rec: JobRecord, result_pcm: bytes, done: Done) -> None: ...


class Worker:
    def __init__(self, outcomes: Outcomes, metrics: Metrics, guard: StepGuard, max_batch: int) -> None:
        self.outcomes = outcomes
        self.metrics = metrics
        self.guard = guard  # cancellation between U-Net blocks, not only between iterations
        self.max_batch = max_batch
        self.sec_per_unit: float | None = None  # measured speed, for estimates
        self.stats = {"steps": 0, "job_iterations": 0, "max_batch_seen": 0, "succeeded": 0}

    def start(self, rec: JobRecord, models: Models | None) -> None:
        assert models is not None and rec.samples is not None
        try:
            models.speaker_encoders(rec.config.id_encoders)  # raises BundleError for a missing WavLM
            job = ProtectionJob(rec.samples, rec.upload.sample_rate, models, rec.config,
                                progress=rec.on_progress, cancel=rec.cancel)
            if not rec.attach(job):  # cancelled while the job was being built: already ended, holds nothing
                return
            if rec.config.iterations == 0:  # as cloak.protect does: no PGD, windows finished unperturbed
                with self.guard.watching([rec]):
                    job.finish_unperturbed()
        except Exception as e:  # noqa: BLE001 - sorted out below
            if self.guard.tripped or rec.cancel.cancelled:
                self.outcomes.end_cancelled(rec)
                return
            self._start_failed(rec, e)
            return
        assert rec.started_at is not None
        self.metrics.queue_wait.observe(rec.started_at - rec.accepted_at)
        rec.set_started(len(job.plan))
        logs.event("job_started", job_id=rec.id, client=rec.client, windows=len(job.plan),
                   queued_s=round(rec.started_at - rec.accepted_at, 3))

    def _start_failed(self, rec: JobRecord, e: Exception) -> None:
        """One job's failure to start must not stop the server."""
        if isinstance(e, BundleError):
            self.outcomes.fail(rec, ErrorKind.FAILED_PRECONDITION, str(e))
        else:
            self.outcomes.fail(rec, ErrorKind.INTERNAL, f"{type(e).__name__}: {e}", exc=True)

    def tick(self, active: list[JobRecord]) -> None:
        runnable: list[JobRecord] = []
        for rec in active:
            if rec.finished or rec.job is None:
                continue
            if rec.cancel.cancelled:
                self.outcomes.end_cancelled(rec)
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
                    self.outcomes.end_cancelled(rec)
                else:
                    self.outcomes.fail(rec, ErrorKind.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
                continue
            prepared[id(rec.job)] = rec
        jobs = [rec.job for rec in prepared.values() if rec.job is not None]
        for batch in step_groups(jobs, self.max_batch):
            self._step([prepared[id(job)] for job in batch])
        for rec in runnable:
            if not rec.finished and rec.job is not None and rec.job.done:
                if rec.cancel.cancelled:  # cancelled during its last step: it must not be delivered
                    self.outcomes.end_cancelled(rec)
                else:
                    self._complete(rec)

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
                self.outcomes.fail(recs[0], ErrorKind.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
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
            out, done = deliver(rec)
        except Exception as e:  # noqa: BLE001
            self.outcomes.fail(rec, ErrorKind.INTERNAL, f"{type(e).__name__}: {e}", exc=True)
            return
        self.outcomes.succeed(rec, out, done)
        self.stats["succeeded"] += 1
        m = done.metrics
        logs.event("job_done", level=30 if m.warning else 20, job_id=rec.id, client=rec.client,
                   seconds=round(m.seconds, 3), queued_s=round(m.queued_seconds, 3),
                   snr_db=None if m.warning else round(m.snr_db, 2), linf=m.linf,
                   output_sha256=done.sha256, **({"warning": m.warning} if m.warning else {}))


def deliver(rec: JobRecord) -> tuple[bytes, Done]:
    """A finished job's output PCM in its upload's encoding, and its summary."""
    assert rec.job is not None and rec.samples is not None  # for the type checker: _complete checked
    res = rec.job.result()
    up = rec.upload
    out = codec.encode(res.audio, up.encoding, reference=rec.samples, epsilon=rec.config.epsilon)
    m = res.metrics
    queued = (rec.started_at or rec.accepted_at) - rec.accepted_at
    linf = codec.delivered_linf(out, up.encoding, rec.samples)
    warning = unprotected_warning(linf, rec.samples)
    snr = 0.0 if warning else float(m["snr_db"])
    details = {k: v for k, v in m.items()
               if k in ("history", "config", "snr_db", "linf", "masking_exponents", "predicted_pesq")}
    if warning:
        details["snr_db"] = None
        details["warning"] = warning
    metrics = ResultMetrics(
        snr_db=snr, linf=linf, warning=warning, losses_start=m["losses_start"], losses_end=m["losses_end"],
        iterations=int(m["iterations"]), windows=int(m["windows"]),
        seconds=time.monotonic() - (rec.started_at or rec.accepted_at), queued_seconds=queued,
        gender=str(m.get("gender", "")), opposite_speaker=str(m.get("opposite_speaker", "")),
        model=str(m.get("model", "")), config=rec.config, details_json=json.dumps(details, default=jsonable))
    return out, Done(sha256=codec.sha256_hex(out), frames=up.frames, encoding=up.encoding, metrics=metrics)


def unprotected_warning(linf: float, samples: np.ndarray) -> str:
    """The result's warning for an output that differs from its input by `linf` (as delivered): empty unless
    nothing changed, in which case the SNR would be meaningless (0 dB for silence, hundreds of dB otherwise)."""
    if linf > 0:
        return ""
    if not np.any(samples):
        return ("NOT PROTECTED: the input is silent (all samples 0), so there is no voice to protect and the output "
                "equals the input (linf 0); no SNR is reported")
    return ("NOT PROTECTED: the output equals the input (linf 0): the perturbation vanished (no loss gradient); "
            "no SNR is reported")
