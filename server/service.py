"""The cloak.v1.CloakService servicer: RPC threads validate, receive and follow; the scheduler does the work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import cloak

from . import logs, pcm
from .config import MAX_CHUNK_BYTES
from .gen import cloak_service_pb2 as pb
from .gen import cloak_service_pb2_grpc as pb_grpc
from .scheduler import JobRecord, NotAccepting, QueueFull, Scheduler

MAX_JOB_ID = 128
HEARTBEAT_S = 15.0  # a stream with nothing new repeats its latest event this often (keeps proxies and clients sure)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CloakService"].full_name


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' -> '127.0.0.1' (the client identity for fair queueing when none is named)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer or "unknown"


def _retry_status(message: str, retry_after: float) -> Any:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(round(retry_after))))
    st = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    st.details.add().Pack(info)
    return rpc_status.to_status(st)


class CloakServicer(pb_grpc.CloakServiceServicer):
    def __init__(self, scheduler: Scheduler, limits: pcm.Limits, device: str) -> None:
        self.sched = scheduler
        self.limits = limits
        self.device = device
        self.started = time.monotonic()

    # --- Protect ---------------------------------------------------------------------------------------------
    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, outcome: str,
                peer: str) -> None:
        self.sched.metrics.jobs.labels(outcome).inc()
        logs.event("job_rejected", level=30 if code == grpc.StatusCode.INVALID_ARGUMENT else 20, peer=peer,
                   code=code.name, reason=message)
        context.abort(code, message)

    def Protect(self, request_iterator: Iterator[pb.ProtectRequest],
                context: grpc.ServicerContext) -> Iterator[pb.ProtectResponse]:
        peer = context.peer()
        bad = grpc.StatusCode.INVALID_ARGUMENT
        try:
            first = next(iter(request_iterator), None)
        except grpc.RpcError:
            return
        if first is None:
            self._reject(context, bad, "empty request stream: the first message must be a ProtectHeader",
                         "rejected_invalid", peer)
        kind = first.WhichOneof("payload")
        if kind != "header":
            self._reject(context, bad, f"the first message must be a ProtectHeader, got {kind or 'an empty message'}",
                         "rejected_invalid", peer)
        header = first.header
        try:
            upload = pcm.validate_header(header, self.limits)
            models = self.sched.models
            if "wavlm" in upload.config.id_encoders and models is not None and models.wavlm is None:
                raise pcm.InvalidInput("settings.id_encoders: this server's model bundle has no WavLM-SV model; "
                                       "use SPEAKER_ENCODER_GE2E")
            if len(header.client_name) > 256:
                raise pcm.InvalidInput("header.client_name: at most 256 characters")
        except pcm.InvalidInput as e:
            self._reject(context, bad, str(e), "rejected_invalid", peer)
        if not self.sched.accepting:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, self.sched.not_accepting_reason(),
                         "rejected_draining", peer)
        remaining = context.time_remaining()
        if remaining is not None:
            est = self.sched.estimate(upload)
            if est is not None and est > remaining:
                self._reject(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"this job needs about {est:.0f} s of protection but the call's deadline is in "
                             f"{remaining:.1f} s; set a later deadline or none", "rejected_deadline", peer)
        try:
            self.sched.reserve()
        except QueueFull as e:
            self.sched.metrics.jobs.labels("rejected_busy").inc()
            logs.event("job_rejected", peer=peer, code="RESOURCE_EXHAUSTED", reason=str(e))
            context.abort_with_status(_retry_status(str(e), e.retry_after))
        except NotAccepting as e:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, str(e), "rejected_draining", peer)
        try:
            receiver = pcm.Receiver(upload, self.limits)
            for i, msg in enumerate(request_iterator, start=2):
                which = msg.WhichOneof("payload")
                if which == "pcm":
                    receiver.add(msg.pcm)
                elif which == "header":
                    raise pcm.InvalidInput(f"message {i}: a second ProtectHeader; send one header, then pcm chunks")
                else:
                    raise pcm.InvalidInput(f"message {i}: empty message (neither header nor pcm)")
            samples = receiver.finish()
        except pcm.InvalidInput as e:
            self.sched.release()
            self._reject(context, bad, str(e), "rejected_invalid", peer)
        except grpc.RpcError:  # the client went away during the upload
            self.sched.release()
            return
        except BaseException:
            self.sched.release()
            raise
        rec = JobRecord(upload, samples, header.client_name or peer_host(peer), header.keep_on_disconnect, peer)
        sub = rec.subscribe()  # before submit: the stream sees every event, however fast the scheduler moves
        try:
            self.sched.submit(rec)
        except NotAccepting as e:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, str(e), "rejected_draining", peer)
        if not context.add_callback(lambda: self.sched.on_rpc_end(rec)):
            self.sched.on_rpc_end(rec)
        yield from self._follow(rec, context, pb.ProtectResponse, sub)

    def _follow(self, rec: JobRecord, context: grpc.ServicerContext, wrap: Callable[..., Any],
                sub: Any = None) -> Iterator[Any]:
        sub = rec.subscribe() if sub is None else sub
        last, last_at = None, time.monotonic()
        try:
            while True:
                item = sub.get(0.5)
                if item is None:
                    if not context.is_active():
                        return
                    if last is not None and time.monotonic() - last_at > HEARTBEAT_S:
                        yield wrap(event=last)  # nothing new (long queue wait, slow iteration): say so again
                        last_at = time.monotonic()
                    continue
                kind, value = item
                if kind in ("event", "progress"):
                    yield wrap(event=value)
                    last, last_at = value, time.monotonic()
                elif kind == "result":
                    data, done = rec.result_pcm, rec.done_event
                    assert data is not None and done is not None
                    for off in range(0, len(data), MAX_CHUNK_BYTES):
                        yield wrap(event=pb.JobEvent(job_id=rec.id, result_chunk=pb.ResultChunk(
                            offset=off, pcm=data[off:off + MAX_CHUNK_BYTES])))
                    yield wrap(event=done)
                    return
                elif kind == "error":
                    code, message = value
                    context.abort(code, message)
        finally:
            rec.unsubscribe(sub)

    # --- by job id ---------------------------------------------------------------------------------------------
    def _record(self, job_id: str, context: grpc.ServicerContext) -> JobRecord:
        if not job_id or len(job_id) > MAX_JOB_ID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job_id must be 1..{MAX_JOB_ID} characters")
        rec = self.sched.get(job_id)
        if rec is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no job {job_id!r} on this server (finished jobs are kept {self.sched.cfg.result_ttl:g} s)")
        return rec

    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> Iterator[pb.AttachResponse]:
        rec = self._record(request.job_id, context)
        rec.attaches += 1
        logs.event("job_attached", job_id=rec.id, peer=context.peer(), state=pb.JobState.Name(rec.state))
        yield from self._follow(rec, context, pb.AttachResponse)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        rec = self._record(request.job_id, context)
        state = self.sched.cancel(rec.id, "cancelled by a Cancel request")
        return pb.CancelResponse(state=state)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        rec = self._record(request.job_id, context)
        return pb.GetJobResponse(status=rec.status(self.sched.cfg.result_ttl))

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
            min_seconds=self.limits.min_seconds)
        return pb.GetServerInfoResponse(
            version=cloak.__version__, state=self.sched.serving_state,
            models=[pb.ModelInfo(name=i.name, sha256=i.sha256 or "", device=i.device, dtype=i.dtype)
                    for i in (models.info if models is not None else [])],
            limits=limits, queue_depth=snap["queue_depth"], active_jobs=snap["active_jobs"], device=self.device,
            defaults=pcm.config_to_settings(cloak.ProtectConfig()),
            uptime_seconds=time.monotonic() - self.started)
