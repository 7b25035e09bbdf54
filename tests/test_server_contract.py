"""The cloak.v1 contract as another language's client sees it (docs/contract.md): BadRequest field paths on every
INVALID_ARGUMENT, RetryInfo + ErrorInfo on every RESOURCE_EXHAUSTED of the server and none on gRPC's own size
limit, the deadline rule and its estimate (EstimateJob, Accepted.estimated_seconds), heartbeats, Attach replay and
resume, and the limits GetServerInfo reports. In-process server on loopback, tiny model."""

from __future__ import annotations

import hashlib
import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_server_helpers import (
    bad_cases,
    bundle_models,
    channel,
    fast,
    fast_settings,
    header,
    kinds,
    messages,
    one_thread,
    raw_protect,
    running,
    speech,
    stub,
    wait_for,
)

from clients.remote import RemoteProtector, ServerUnavailable
from server import errors, service
from server.gen import cloak_service_pb2 as pb

# the optional scalar settings (every ProtectConfig field the wire carries that is not an enum or a list)
SCALAR_SETTINGS = [f.name for f in pb.ProtectSettings.DESCRIPTOR.fields if f.has_presence and f.message_type is None]

# the field path each of test_server's bad requests must name (ProtectRequest is the request message)
BAD_CASE_FIELDS = {
    "wrong sha": "header.sha256", "bad sha format": "header.sha256", "truncated stream": "pcm",
    "too much pcm": "pcm", "zero frames": "header.frames", "too short": "header.frames",
    "too long": "header.frames", "NaN samples": "pcm", "9 channels": "header.channels",
    "rate too low": "header.sample_rate", "rate too high": "header.sample_rate", "no encoding": "header.encoding",
    "oversize chunk": "pcm", "no header": "header", "empty stream": "header", "two headers": "header",
    "empty message": "pcm", "epsilon out of range": "header.settings.epsilon",
    "step above epsilon": "header.settings.step_size", "iterations out of range": "header.settings.iterations",
    "three weights": "header.settings.weights", "negative weight": "header.settings.weights",
    "NaN window": "header.settings.window_seconds", "seed too big": "header.settings.seed",
    "unknown gender": "header.settings.gender", "unknown loss": "header.settings.losses",
    "wavlm missing": "header.settings.id_encoders",
}
# one out-of-range value per optional scalar setting
OUT_OF_RANGE = {
    "epsilon": 0.5, "step_size": 0.05, "iterations": 20000, "repeats": 65, "t_adv": 0, "seed": 2**63,
    "source_frames": 8, "window_seconds": 0.5, "overlap_seconds": 60.0, "inference_steps": 1001,
    "early_stop": None, "early_stop_every": 0, "early_stop_identity_drop": 3.0, "early_stop_quality": 6.0,
    "shaping": "loud", "masking_margin_db": 61.0, "masking_exponent": 1.5, "random_start": None,
    "quality_target": 1.0,
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    return bundle_models(tmp_path_factory.mktemp("contract"))[0]


def rich(e: grpc.RpcError) -> dict[str, object]:
    """The google.rpc.Status details of a failed call, by type name ({} when the trailer has none)."""
    st = rpc_status.from_call(e)
    if st is None:
        return {}
    assert st.code == e.code().value[0] and st.message == e.details()
    out: dict[str, object] = {}
    for d in st.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


def resolve(path: str, message: descriptor.Descriptor) -> None:
    """Fail unless `path` ("header.settings.weights[1]") walks proto field names from `message`."""
    for part in path.split("."):
        name = part.split("[")[0]
        assert name in message.fields_by_name, (path, name, message.full_name)
        field = message.fields_by_name[name]
        if "[" in part:
            assert field.is_repeated, path
        message = field.message_type


def violations(e: grpc.RpcError) -> list[str]:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    bad = rich(e).get("BadRequest")
    assert isinstance(bad, error_details_pb2.BadRequest), e.details()
    assert all(v.description == e.details() for v in bad.field_violations)
    return [v.field for v in bad.field_violations]


def protect_error(s, msgs, **kw) -> grpc.RpcError:
    call = s.Protect(iter(msgs), **kw)
    with pytest.raises(grpc.RpcError) as ei:
        for _ in call:
            pass
    return ei.value


def reason(e: grpc.RpcError) -> str:
    info = rich(e).get("ErrorInfo")
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.domain == "cloak.v1", e.details()
    return info.reason


def test_every_invalid_argument_names_its_fields_in_a_bad_request(models):
    with running(models) as srv, channel(srv) as ch:
        s = stub(ch)
        cases = bad_cases()
        assert {name for name, _, _ in cases} == set(BAD_CASE_FIELDS)
        for name, msgs, _ in cases:
            e = protect_error(s, msgs, timeout=20)
            fields = violations(e)
            assert fields == [BAD_CASE_FIELDS[name]], (name, fields, e.details())
            resolve(fields[0], pb.ProtectRequest.DESCRIPTOR)
        # every setting, out of range, through Protect's own validation (EstimateJob shares it)
        good_h, _ = header(speech(0.5), 16000)
        assert set(OUT_OF_RANGE) == set(SCALAR_SETTINGS)
        for name, value in OUT_OF_RANGE.items():
            if value is None:
                continue  # a bool has no out-of-range value on the wire
            h = pb.ProtectHeader()
            h.CopyFrom(good_h)
            setattr(h.settings, name, value)
            with pytest.raises(grpc.RpcError) as ei:
                s.EstimateJob(pb.EstimateJobRequest(header=h), timeout=10)
            assert violations(ei.value) == [f"header.settings.{name}"], (name, ei.value.details())
        h = pb.ProtectHeader()
        h.CopyFrom(good_h)
        h.settings.weights[:] = [1.0, 1e200, 1.0, 1.0]
        with pytest.raises(grpc.RpcError) as ei:
            s.EstimateJob(pb.EstimateJobRequest(header=h), timeout=10)
        assert violations(ei.value) == ["header.settings.weights[1]"]
        resolve("header.settings.weights[1]", pb.EstimateJobRequest.DESCRIPTOR)
        # ids: the unary calls and Attach name their own request's fields
        for call in (s.GetJob, s.Cancel):
            req = (pb.GetJobRequest if call is s.GetJob else pb.CancelRequest)(job_id="")
            with pytest.raises(grpc.RpcError) as ei:
                call(req, timeout=10)
            assert violations(ei.value) == ["job_id"]
        with pytest.raises(grpc.RpcError) as ei:
            list(s.Attach(pb.AttachRequest(job_id="x" * 200), timeout=10))
        assert violations(ei.value) == ["job_id"]


def test_a_job_that_can_never_fit_names_its_fields_and_reason(models):
    with running(models, memory_budget=64 << 20) as srv, channel(srv) as ch:
        s = stub(ch)
        h, data = header(speech(0.5), 16000, fast_settings(repeats=64, source_frames=1024))
        for e in (protect_error(s, messages(h, data), timeout=20),
                  pytest.raises(grpc.RpcError, s.EstimateJob, pb.EstimateJobRequest(header=h), timeout=10).value):
            assert violations(e) == ["header.settings.repeats", "header.settings.source_frames",
                                     "header.settings.window_seconds"]
            assert reason(e) == "ERROR_REASON_JOB_TOO_LARGE"
            info = rich(e)["ErrorInfo"]
            assert int(info.metadata["need_bytes"]) > int(info.metadata["budget_bytes"]) == 64 << 20


def test_resource_exhausted_says_whether_to_retry(models, monkeypatch):
    """Queue full: RetryInfo + ErrorInfo QUEUE_FULL. gRPC's own message-size limit: RESOURCE_EXHAUSTED with no
    details at all, so that a client retrying only on RetryInfo does not loop. Queued streams get heartbeats
    marked as such."""
    monkeypatch.setattr(service, "HEARTBEAT_S", 0.3)
    with running(models, max_batch=1, max_queue=1) as srv, channel(srv) as ch:
        s = stub(ch)
        long_h, long_data = header(speech(1.0), 16000, fast_settings(iterations=5000))
        running_call = s.Protect(iter(messages(long_h, long_data)))
        first = iter(running_call)
        wait_for(lambda: next(first).event.WhichOneof("kind") == "progress", timeout=60)
        queued_call = s.Protect(iter(messages(long_h, long_data)))
        waiting: list[pb.JobEvent] = []
        for r in queued_call:
            waiting.append(r.event)
            if sum(e.heartbeat for e in waiting) >= 2:
                break
        assert kinds(waiting)[0] == "accepted" and not waiting[0].heartbeat
        beats = [e for e in waiting if e.heartbeat]
        assert all(e.WhichOneof("kind") == "accepted" and e.accepted == waiting[0].accepted for e in beats)
        assert sum(not e.heartbeat for e in waiting) == 1  # nothing new happened: only heartbeats followed
        # the queue (max_queue 1) is full now
        h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
        e = protect_error(s, messages(h, data), timeout=600)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rich(e)
        retry = details["RetryInfo"]
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert 1.0 <= retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 <= 600
        assert reason(e) == "ERROR_REASON_QUEUE_FULL"
        queued_call.cancel()
        running_call.cancel()
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}, timeout=30)
        # a message over the server's 4 MiB: gRPC's RESOURCE_EXHAUSTED, no status details
        audio = np.zeros((48000 * 30, 2), np.float32)
        big_h, big = header(audio, 48000)
        # (a deadline well above the server's estimate for a 30 s clip, so that the deadline rule lets it through)
        e = protect_error(s, [pb.ProtectRequest(header=big_h), pb.ProtectRequest(pcm=big[:5 << 20])], timeout=3600)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and rich(e) == {}, e.details()
        info = s.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.limits.max_message_bytes == 4 << 20 < 5 << 20
        assert srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}  # its slot was given back
        # the Python client retries busy servers on RetryInfo only: this one fails at once
        with RemoteProtector(srv.address, chunk_bytes=5 << 20) as rp:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailable) as ei:
                rp.protect(audio, 48000, fast(), busy_retries=3)
            assert ei.value.code == "RESOURCE_EXHAUSTED" and ei.value.retry_after is None
            assert time.monotonic() - t0 < 2.0


def test_deadline_rule_and_its_estimate(models):
    with running(models) as srv, channel(srv) as ch:
        s = stub(ch)
        h, data = header(speech(0.5), 16000, fast_settings(iterations=2))
        est = s.EstimateJob(pb.EstimateJobRequest(header=pb.ProtectHeader(
            sample_rate=h.sample_rate, channels=h.channels, frames=h.frames, encoding=h.encoding,
            settings=h.settings)), timeout=10)  # no sha256: nothing is uploaded
        # a fresh server has timed nothing: no estimate, and no deadline is refused up front
        assert not est.HasField("protect_seconds") and not est.HasField("backlog_seconds")
        assert est.windows == 1 and est.iterations == 2 and est.memory_bytes > 0 and est.memory_free_bytes > 0
        assert est.state == pb.SERVING_STATE_SERVING and est.queue_depth == 0 and est.active_jobs == 0
        events, code, _ = raw_protect(s, messages(h, data), timeout=120)
        assert code == grpc.StatusCode.OK and not events[0].accepted.HasField("estimated_seconds")
        # now it has: the estimate scales with the work, and Accepted carries the same figure
        est2 = s.EstimateJob(pb.EstimateJobRequest(header=h), timeout=10)
        assert est2.protect_seconds > 0 and est2.backlog_seconds == 0
        long_h, long_data = header(speech(0.5), 16000, fast_settings(iterations=4000))
        est_long = s.EstimateJob(pb.EstimateJobRequest(header=long_h), timeout=10)
        assert est_long.protect_seconds == pytest.approx(2000 * est2.protect_seconds, rel=0.05)
        assert est_long.protect_seconds > 10
        # a deadline shorter than the estimate: refused at once, before the upload, with the figures
        t0 = time.monotonic()
        e = protect_error(s, messages(long_h, long_data), timeout=est_long.protect_seconds / 2)
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
        assert reason(e) == "ERROR_REASON_DEADLINE_TOO_SHORT"
        meta = rich(e)["ErrorInfo"].metadata
        assert float(meta["estimated_seconds"]) == pytest.approx(est_long.protect_seconds, rel=0.5)
        assert float(meta["deadline_seconds"]) < float(meta["estimated_seconds"])
        # a deadline the estimate fits is accepted; Accepted says the estimate
        events, code, _ = raw_protect(s, messages(h, data), timeout=max(30.0, 3 * est2.protect_seconds))
        assert code == grpc.StatusCode.OK
        assert events[0].accepted.estimated_seconds == pytest.approx(est2.protect_seconds, rel=0.5)


def test_attach_replays_the_history_and_resumes_a_download(models):
    with running(models) as srv, channel(srv) as ch:
        s = stub(ch)
        audio = speech(1.0, 48000, channels=2)  # 384 KB of float32 output
        h, data = header(audio, 48000, fast_settings(iterations=2))
        events, code, _ = raw_protect(s, messages(h, data), timeout=120)
        assert code == grpc.StatusCode.OK
        job = events[0].job_id
        result = b"".join(e.result_chunk.pcm for e in events if e.WhichOneof("kind") == "result_chunk")
        assert len(result) == len(data)
        replay = [r.event for r in s.Attach(pb.AttachRequest(job_id=job), timeout=30)]
        assert kinds(replay) == ["accepted", "started", "progress", "result_chunk", "done"]
        assert not any(e.heartbeat for e in replay)
        assert replay[0] == events[0] and replay[-1] == events[-1]
        assert replay[2].progress.iteration == 2  # only the latest progress is replayed
        cut = 123_457  # anywhere, even inside a frame
        resumed = [r.event for r in s.Attach(pb.AttachRequest(job_id=job, result_offset=cut), timeout=30)]
        chunks = [e.result_chunk for e in resumed if e.WhichOneof("kind") == "result_chunk"]
        assert chunks[0].offset == cut and b"".join(c.pcm for c in chunks) == result[cut:]
        assert hashlib.sha256(result[:cut] + b"".join(c.pcm for c in chunks)).hexdigest() == resumed[-1].done.sha256
        end = [r.event for r in s.Attach(pb.AttachRequest(job_id=job, result_offset=len(result)), timeout=30)]
        assert kinds(end)[-2:] == ["progress", "done"]
        with pytest.raises(grpc.RpcError) as ei:
            list(s.Attach(pb.AttachRequest(job_id=job, result_offset=len(result) + 1), timeout=30))
        assert violations(ei.value) == ["result_offset"]


def test_server_info_reports_the_contract_limits(models):
    with running(models) as srv, channel(srv) as ch:
        lim = stub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=10).limits
        assert lim.min_seconds == pytest.approx(0.1) and lim.max_chunk_bytes == 1 << 20
        assert lim.max_message_bytes == 4 << 20 and lim.heartbeat_seconds == service.HEARTBEAT_S == 15


def test_field_paths_of_validator_messages():
    assert errors.field_paths(ValueError("settings.weights[3] (sem) must be a finite number")) == \
        ["header.settings.weights[3]"]
    assert errors.field_paths(ValueError("settings: bad type")) == ["header.settings"]
    assert errors.field_paths(ValueError("pcm chunk 2 is 5 bytes")) == ["pcm"]
    assert errors.field_paths(ValueError("sha256 mismatch: ...")) == ["header.sha256"]
    assert errors.field_paths(errors.FieldError("anything", "a.b", "c")) == ["a.b", "c"]
