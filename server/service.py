"""The cloak.v1.CloakService servicer: RPC threads validate, receive and follow; the scheduler does the work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

import cloak
from cloak.protect import voice_applicable

from . import errors, events_pb, logs, memory, pcm, wire
from .config import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES
from .events import Ended, Succeeded
from .gen import cloak_service_pb2 as pb
from .gen import cloak_service_pb2_grpc as pb_grpc
from .jobs import JobRecord, Subscription
from .scheduler import NotAccepting, QueueFull, Scheduler
from .streams import Gone, Once, Reader, StreamCaps, peer_host

MAX_JOB_ID = 128
CANCEL_WAIT_S = 10.0  # Cancel waits this long at most for the job to stop before answering its state
CANCEL_WAITERS = 8  # Cancel calls waiting at once (each holds a unary thread); more answer without waiting
HEARTBEAT_S = 15.0  # a stream with nothing new repeats its latest event this often (keeps proxies and clients sure)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CloakService"].full_name


class CloakServicer(pb_grpc.CloakServiceServicer):
    def __init__(self, scheduler: Scheduler, limits: pcm.Limits, device: str, caps: StreamCaps | None = None,
                 upload_idle_timeout: float = 20.0,
                 identify: Callable[[grpc.ServicerContext], str | None] | None = None) -> None:
        self.sched = scheduler
        self.limits = limits
        self.device = device
        cfg = scheduler.cfg
        self.caps = caps or StreamCaps(cfg.max_queue + cfg.max_batch + 8, cfg.max_attach, cfg.max_attach_per_job,
                                       cfg.max_attach_per_client)
        self.upload_idle_timeout = upload_idle_timeout
        self._identify = identify
        self._cancel_waits = threading.BoundedSemaphore(CANCEL_WAITERS)
        self._refusals = logs.Throttle()
        self.started = time.monotonic()

    def bind_pool(self, pool: ThreadPoolExecutor) -> None:
        """Run the streaming handlers (Protect, Attach) in `pool`, apart from the unary ones and health: gRPC
        takes a handler's pool from its `experimental_thread_pool` attribute."""
        for name in ("Protect", "Attach"):
            method = getattr(type(self), name).__get__(self)

            def behavior(request: Any, context: grpc.ServicerContext, _m: Callable[..., Any] = method) -> Any:
                return _m(request, context)

            behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
            setattr(self, name, behavior)

    def owner(self, context: grpc.ServicerContext) -> str | None:
        """The caller's name from its credentials (--tokens-file); None for an anonymous caller."""
        return self._identify(context) if self._identify is not None else None

    def identity(self, context: grpc.ServicerContext) -> str:
        """Who is calling, for fair share and stream caps: the token's name (--tokens-file), else the peer's
        host. Never the self-declared client_name, which anyone can change to dodge fairness."""
        return self.owner(context) or peer_host(context.peer())

    # --- Protect ---------------------------------------------------------------------------------------------
    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, outcome: str,
                peer: str, status: grpc.Status | None = None) -> None:
        """End the call with `code` (and `status`, its rich form with details, when given)."""
        self.sched.metrics.jobs.labels(outcome).inc()
        logs.event("job_rejected", level=30 if code == grpc.StatusCode.INVALID_ARGUMENT else 20, peer=peer,
                   code=code.name, reason=message)
        if status is not None:
            context.abort_with_status(status)
        context.abort(code, message)

    def _invalid(self, context: grpc.ServicerContext, e: Exception, peer: str) -> None:
        """INVALID_ARGUMENT with a google.rpc.BadRequest naming the field(s) at fault."""
        self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "rejected_invalid", peer, errors.invalid(e))

    def _check_header(self, header: pb.ProtectHeader) -> pcm.Upload:
        """Everything Protect checks about a header before any PCM arrives; raises InvalidInput."""
        upload = pcm.validate_header(header, self.limits)
        models = self.sched.models
        if "wavlm" in upload.config.id_encoders and models is not None and models.wavlm is None:
            raise pcm.InvalidInput("settings.id_encoders: this server's model bundle has no WavLM-SV model; "
                                   "use SPEAKER_ENCODER_GE2E")
        if models is not None:  # L_voice drops out on a DiffVC without a speaker-adaptive prior
            try:
                voice_applicable(upload.config.loss_weights, models)
            except cloak.BundleError as e:
                raise pcm.InvalidInput(f"settings.weights: no enabled loss term applies to this server's model: "
                                       f"{e}") from e
        if len(header.client_name) > 256:
            raise pcm.InvalidInput("header.client_name: at most 256 characters")
        return upload

    def _too_large(self, upload: pcm.Upload) -> tuple[memory.Estimate, grpc.Status | None]:
        """The job's memory estimate, and the INVALID_ARGUMENT status when it could never fit the budget."""
        need = self.sched.memory_estimate(upload)
        budget = self.sched.memory.total
        if need.peak <= budget:
            return need, None
        if need.dominant == "settings.repeats":
            paths = ["header.settings.repeats", "header.settings.source_frames", "header.settings.window_seconds"]
        else:
            paths = ["header.frames"]
        field = " / ".join(p.removeprefix("header.") if p.startswith("header.settings") else p for p in paths)
        message = (f"{field}: this job would need about {memory.fmt(need.peak)} of memory at its peak (upload "
                   f"{memory.fmt(need.upload)}, protection {memory.fmt(need.job)}, of which the U-Net "
                   f"{memory.fmt(need.unet)}) and this server's --memory-budget is {memory.fmt(budget)}: send a "
                   "shorter clip, or use fewer repeats, source frames or a shorter window")
        return need, errors.bad_request(message, paths, pb.ERROR_REASON_JOB_TOO_LARGE, need_bytes=need.peak,
                                        budget_bytes=budget)

    def Protect(self, request_iterator: Iterator[pb.ProtectRequest],
                context: grpc.ServicerContext) -> Iterator[pb.ProtectResponse]:
        peer = context.peer()
        who = self.identity(context)
        why = self.caps.enter_protect(who)
        if why:
            self.sched.metrics.jobs.labels("rejected_busy").inc()
            held = self._refusals.allow("protect:" + who)
            if held is not None:
                logs.event("upload_refused", level=30, client=who, peer=peer, reason=why, suppressed=held)
            context.abort_with_status(errors.exhausted(f"too many uploads at once: {why}; retry shortly", 2.0,
                                                       pb.ERROR_REASON_TOO_MANY_UPLOADS))
        once = Once(lambda: self.caps.leave_protect(who))
        if not context.add_callback(once):
            once()
        reader = Reader(request_iterator)
        try:
            yield from self._protect(reader, context, peer)
        finally:
            reader.stop()
            once()

    def _next(self, reader: Reader, context: grpc.ServicerContext, idle_since: list[float], peer: str,
              what: str) -> Any:
        """The next request message, or None at the end of the stream. Aborts DEADLINE_EXCEEDED when no PCM
        byte (or, first, no header) arrived for --upload-idle-timeout seconds; raises Gone when the client left."""
        limit = self.upload_idle_timeout
        while True:
            left = idle_since[0] + limit - time.monotonic()
            if left <= 0:
                self.sched.metrics.jobs.labels("rejected_idle").inc()
                logs.event("upload_idle_timeout", level=30, peer=peer, waiting_for=what, seconds=limit)
                context.abort_with_status(errors.with_reason(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no {what} for {limit:g} s (the server's --upload-idle-timeout): the upload was dropped and its "
                    "queue slot freed; send the PCM without long pauses", pb.ERROR_REASON_UPLOAD_IDLE,
                    idle_timeout_seconds=f"{limit:g}"))
            kind, value = reader.get(min(left, 1.0))
            if kind == "wait":
                if not context.is_active():
                    raise Gone()
                continue
            if kind == "msg":
                return value
            if kind == "end":
                return None
            if kind == "gone":
                raise Gone()
            raise value  # an unexpected error in the reader

    def _protect(self, reader: Reader, context: grpc.ServicerContext, peer: str) -> Iterator[pb.ProtectResponse]:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        idle_since = [time.monotonic()]
        try:
            first = self._next(reader, context, idle_since, peer, "ProtectHeader")
        except Gone:
            return
        if first is None:
            self._invalid(context, errors.FieldError(
                "empty request stream: the first message must be a ProtectHeader", "header"), peer)
        kind = first.WhichOneof("payload")
        if kind != "header":
            self._invalid(context, errors.FieldError(
                f"the first message must be a ProtectHeader, got {kind or 'an empty message'}", "header"), peer)
        header = first.header
        try:
            upload = self._check_header(header)
        except pcm.InvalidInput as e:
            self._invalid(context, e, peer)
        if not self.sched.accepting:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, self.sched.not_accepting_reason(),
                         "rejected_draining", peer)
        remaining = context.time_remaining()
        est = self.sched.estimate(upload)
        if remaining is not None and est is not None and est > remaining:
            why = (f"this job needs about {est:.0f} s of protection but the call's deadline is in {remaining:.1f} s; "
                   "set a later deadline or none (EstimateJob answers the estimate)")
            self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED, why, "rejected_deadline", peer,
                         errors.with_reason(grpc.StatusCode.DEADLINE_EXCEEDED, why,
                                            pb.ERROR_REASON_DEADLINE_TOO_SHORT, estimated_seconds=f"{est:.3f}",
                                            deadline_seconds=f"{remaining:.3f}"))
        need, too_large = self._too_large(upload)
        if too_large is not None:
            self._reject(context, bad, too_large.details, "rejected_invalid", peer, too_large)
        budget = self.sched.memory.total
        try:
            self.sched.reserve()
        except QueueFull as e:
            self.sched.metrics.jobs.labels("rejected_busy").inc()
            logs.event("job_rejected", peer=peer, code="RESOURCE_EXHAUSTED", reason=str(e))
            context.abort_with_status(errors.exhausted(str(e), e.retry_after, pb.ERROR_REASON_QUEUE_FULL,
                                                       queue_depth=e.depth))
        except NotAccepting as e:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, str(e), "rejected_draining", peer)
        if not self.sched.take_memory(need.peak):
            self.sched.release()
            self.sched.metrics.jobs.labels("rejected_memory").inc()
            retry = self.sched.retry_after()
            why = (f"not enough memory now: this job needs about {memory.fmt(need.peak)} and "
                   f"{memory.fmt(max(0, self.sched.memory.free))} of the {memory.fmt(budget)} budget are free; "
                   f"retry in about {retry:.0f} s")
            logs.event("job_rejected", peer=peer, code="RESOURCE_EXHAUSTED", reason=why)
            context.abort_with_status(errors.exhausted(why, retry, pb.ERROR_REASON_MEMORY_BUSY, need_bytes=need.peak,
                                                       free_bytes=max(0, self.sched.memory.free)))
        held = Once(lambda: self.sched.give_memory(need.peak))
        released = Once(self.sched.release)
        received = False
        try:
            receiver = pcm.Receiver(upload, self.limits)
            idle_since[0] = time.monotonic()
            i = 1
            while True:
                msg = self._next(reader, context, idle_since, peer, "PCM bytes")
                if msg is None:
                    break
                i += 1
                which = msg.WhichOneof("payload")
                if which == "pcm":
                    receiver.add(msg.pcm)
                    if msg.pcm:  # an empty chunk is no progress: it does not hold the slot any longer
                        idle_since[0] = time.monotonic()
                elif which == "header":
                    raise errors.FieldError(f"message {i}: a second ProtectHeader; send one header, then pcm chunks",
                                            "header")
                else:
                    raise errors.FieldError(f"message {i}: empty message (neither header nor pcm)", "pcm")
            samples = receiver.finish()
            received = True  # the reservation becomes the job's queue slot in submit()
        except pcm.InvalidInput as e:
            released()
            held()
            self._invalid(context, e, peer)
        except (Gone, grpc.RpcError):  # the client went away during the upload
            released()
            held()
            return
        finally:
            if not received:
                released()  # the idle-timeout abort and anything unexpected free the slot too
                held()
        owner = self.owner(context)
        rec = JobRecord(upload, samples, owner or peer_host(peer), header.keep_on_disconnect, peer, owner=owner,
                        client_name=header.client_name, estimated_seconds=est)
        rec.mem = need.peak  # the job holds the reservation from here on; the scheduler gives it back
        sub = rec.subscribe()  # before submit: the stream sees every event, however fast the scheduler moves
        try:
            self.sched.submit(rec)
        except NotAccepting as e:
            held()
            self._reject(context, grpc.StatusCode.UNAVAILABLE, str(e), "rejected_draining", peer)
        if not context.add_callback(lambda: self.sched.on_rpc_end(rec)):
            self.sched.on_rpc_end(rec)
        yield from self._follow(rec, context, pb.ProtectResponse, sub)

    def _follow(self, rec: JobRecord, context: grpc.ServicerContext, wrap: Callable[..., Any],
                sub: Subscription | None = None, result_offset: int = 0) -> Iterator[Any]:
        sub = rec.subscribe() if sub is None else sub
        last, last_at = None, time.monotonic()
        try:
            while True:
                item = sub.get(0.5)
                if item is None:
                    if not context.is_active():
                        return
                    if last is not None and time.monotonic() - last_at > HEARTBEAT_S:
                        # nothing new (long queue wait, slow iteration): say so again, marked as a repeat
                        beat = pb.JobEvent()
                        beat.CopyFrom(last)
                        beat.heartbeat = True
                        yield wrap(event=beat)
                        last_at = time.monotonic()
                    continue
                if isinstance(item, Succeeded):
                    data = item.pcm
                    for off in range(min(result_offset, len(data)), len(data), MAX_CHUNK_BYTES):
                        yield wrap(event=pb.JobEvent(job_id=rec.id, result_chunk=pb.ResultChunk(
                            offset=off, pcm=data[off:off + MAX_CHUNK_BYTES])))
                    yield wrap(event=events_pb.done_event(rec.id, item.done))
                    return
                if isinstance(item, Ended):
                    context.abort(events_pb.status_code(item.kind), item.message)
                event = events_pb.job_event(rec.id, item)
                yield wrap(event=event)
                last, last_at = event, time.monotonic()
        finally:
            rec.unsubscribe(sub)

    # --- by job id ---------------------------------------------------------------------------------------------
    def _record(self, job_id: str, context: grpc.ServicerContext) -> JobRecord:
        if not job_id or len(job_id) > MAX_JOB_ID:
            context.abort_with_status(errors.bad_request(f"job_id must be 1..{MAX_JOB_ID} characters", ["job_id"]))
        rec = self.sched.get(job_id)
        # another identity's job is as good as absent: NOT_FOUND says nothing about whether it exists
        if rec is None or (rec.owner is not None and rec.owner != self.owner(context)):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no job {job_id!r} of yours on this server (finished jobs are kept "
                          f"{self.sched.cfg.result_ttl:g} s; jobs live in memory only, so a restart loses them)")
        return rec

    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> Iterator[pb.AttachResponse]:
        rec = self._record(request.job_id, context)
        if request.result_offset > rec.upload.nbytes:
            context.abort_with_status(errors.bad_request(
                f"result_offset {request.result_offset} is past the end of the output ({rec.upload.nbytes} bytes)",
                ["result_offset"]))
        who = self.identity(context)
        why = self.caps.enter_attach(rec.id, who)
        if why:
            held = self._refusals.allow("attach:" + who)  # a client can cause these at will: rate-limited
            if held is not None:
                logs.event("attach_refused", level=30, job_id=rec.id, client=who, peer=context.peer(), reason=why,
                           suppressed=held)
            context.abort_with_status(errors.exhausted(why + "; close another stream or retry later", 5.0,
                                                       pb.ERROR_REASON_TOO_MANY_ATTACH_STREAMS))
        once = Once(lambda: self.caps.leave_attach(rec.id, who))
        if not context.add_callback(once):
            once()
        try:
            rec.attaches += 1
            logs.event("job_attached", job_id=rec.id, peer=context.peer(), client=who,
                       state=pb.JobState.Name(events_pb.job_state(rec.state)))
            yield from self._follow(rec, context, pb.AttachResponse, result_offset=request.result_offset)
        finally:
            once()

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        rec = self._record(request.job_id, context)
        # wait (a little, and only a few calls at a time: they hold unary threads) for the state the job really
        # ends in, so that CANCELLED is never answered for a job that goes on to deliver its result
        waits = self._cancel_waits.acquire(blocking=False)
        try:
            wait = min(CANCEL_WAIT_S, max(0.0, context.time_remaining() - 0.2)) if waits else 0.0
            state = self.sched.cancel_record(rec, "cancelled by a Cancel request", wait=wait)
        finally:
            if waits:
                self._cancel_waits.release()
        logs.event("job_cancel_requested", job_id=rec.id, client=self.identity(context),
                   state=pb.JobState.Name(events_pb.job_state(state)))
        return pb.CancelResponse(state=events_pb.job_state(state))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        rec = self._record(request.job_id, context)
        return pb.GetJobResponse(status=events_pb.job_status(rec.status(self.sched.cfg.result_ttl)))

    # --- server ------------------------------------------------------------------------------------------------
    def GetServerInfo(self, request: pb.GetServerInfoRequest,
                      context: grpc.ServicerContext) -> pb.GetServerInfoResponse:
        cfg = self.sched.cfg
        models = self.sched.models
        snap = self.sched.snapshot()
        limits = pb.ServerLimits(
            max_queue=cfg.max_queue, max_batch=cfg.max_batch, max_seconds=self.limits.max_seconds,
            max_chunk_bytes=self.limits.max_chunk_bytes, min_sample_rate=cloak.audio.MIN_SAMPLE_RATE,
            max_sample_rate=cloak.audio.MAX_SAMPLE_RATE, max_channels=cloak.audio.MAX_CHANNELS,
            max_upload_bytes=self.limits.max_upload_bytes, result_ttl_seconds=cfg.result_ttl,
            min_seconds=self.limits.min_seconds, upload_idle_timeout_seconds=self.upload_idle_timeout,
            max_attach_per_job=self.caps.per_job, max_attach_per_client=self.caps.per_client,
            memory_budget_bytes=self.sched.memory.total, max_message_bytes=MAX_MESSAGE_BYTES,
            heartbeat_seconds=HEARTBEAT_S)
        return pb.GetServerInfoResponse(
            version=cloak.__version__, state=events_pb.serving_state(self.sched.serving_state),
            models=[pb.ModelInfo(name=i.name, sha256=i.sha256 or "", device=i.device, dtype=i.dtype)
                    for i in (models.info if models is not None else [])],
            limits=limits, queue_depth=snap["queue_depth"], active_jobs=snap["active_jobs"], device=self.device,
            defaults=wire.config_to_settings(cloak.ProtectConfig()),
            uptime_seconds=time.monotonic() - self.started)

    def EstimateJob(self, request: pb.EstimateJobRequest, context: grpc.ServicerContext) -> pb.EstimateJobResponse:
        header = pb.ProtectHeader()
        header.CopyFrom(request.header)
        if not header.sha256:
            header.sha256 = "0" * 64  # no PCM is sent: nothing to check it against
        try:
            upload = self._check_header(header)
        except pcm.InvalidInput as e:
            context.abort_with_status(errors.invalid(e))
        need, too_large = self._too_large(upload)
        if too_large is not None:
            context.abort_with_status(too_large)
        windows, _ = upload.plan_size()
        snap = self.sched.snapshot()
        out = pb.EstimateJobResponse(
            windows=windows, iterations=windows * upload.config.iterations, memory_bytes=need.peak,
            memory_free_bytes=max(0, self.sched.memory.free), queue_depth=snap["queue_depth"],
            active_jobs=snap["active_jobs"], state=events_pb.serving_state(self.sched.serving_state))
        est, backlog = self.sched.estimate(upload), self.sched.backlog_seconds()
        if est is not None:
            out.protect_seconds = est
        if backlog is not None:
            out.backlog_seconds = backlog
        return out
