"""The cloak.v1 gRPC server, in-process on loopback, with a tiny DiffVC bundle and real corpus speech: the
contract, round trips, the queue and jobs, bad input. Security is test_server_auth's, health test_server_health's."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_helpers import (  # noqa: F401 - fixtures are found by name (the autouse one, and arguments)
    SERVING,
    bad_cases,
    ch_fixture,
    channel,
    fast,
    fast_settings,
    header,
    health_status,
    kinds,
    long_job,
    messages,
    models_fixture,
    one_torch_thread,
    raw_protect,
    result_audio,
    running,
    speech,
    stub,
    wait_for,
)

from clients.remote import RemoteProtector, ServerUnavailable
from cloak import AudioError, ConfigError, protect
from cloak.protect import ProtectionJob, run_jobs
from server.events import JobState
from server.gen import cloak_service_pb2 as pb


@pytest.fixture(scope="module")
def server(models):
    with running(models, max_batch=4, max_queue=16, metrics_port=0) as srv:
        yield srv


# ------------------------------------------------------------------------------------------- contract
def test_server_info(ch, server, models):
    info = stub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.state == pb.SERVING_STATE_SERVING and info.version
    assert [m.name for m in info.models] == [i.name for i in models.info]
    # dtype is what the resident models report: fp32, or bf16 autocast where the CPU has native bf16
    assert all(len(m.sha256) == 64 and m.device == "cpu" and m.dtype == i.dtype and m.dtype.startswith("float32")
               for m, i in zip(info.models, models.info, strict=True))
    assert info.limits.max_batch == 4 and info.limits.max_queue == 16 and info.limits.max_seconds == 600
    assert info.limits.max_chunk_bytes == 1 << 20 and info.limits.max_channels == 8
    assert info.defaults.iterations == 50 and info.defaults.epsilon == pytest.approx(0.002)
    assert health_status(ch) == SERVING and health_status(ch, "cloak.v1.CloakService") == SERVING


def test_reflection_lists_services(ch):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    rs = reflection_pb2_grpc.ServerReflectionStub(ch)
    (resp,) = list(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"cloak.v1.CloakService", "grpc.health.v1.Health"} <= names
    # what grpcurl asks next: the file that defines the service
    (resp,) = list(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="cloak.v1.CloakService")]), timeout=10))
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in resp.file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "cloak/v1/cloak_service.proto" for f in files)


# ------------------------------------------------------------------------------------------ round trips
def test_round_trip_48k_stereo_identical_to_local(ch, models):
    audio = speech(1.5, 48000, 2)
    cfg = fast(seed=5)
    h, data = header(audio, 48000, fast_settings(seed=5))
    events, code, details = raw_protect(stub(ch), messages(h, data, chunk=1 << 20))
    assert code == grpc.StatusCode.OK, details
    k = kinds(events)
    assert k[0] == "accepted" and k[-1] == "done" and "started" in k
    assert [e.progress.iteration for e in events if e.WhichOneof("kind") == "progress"] == [1, 2]
    assert len({e.job_id for e in events}) == 1
    out = result_audio(events, audio.shape)
    local = protect(audio, 48000, models, cfg)
    assert np.array_equal(out, local.audio)  # bit-identical to local protection with the same seed
    done = events[-1].done
    assert done.frames == audio.shape[0] and done.encoding == pb.SAMPLE_ENCODING_FLOAT32
    assert done.metrics.snr_db == pytest.approx(local.metrics["snr_db"])
    assert set(done.metrics.losses_end) == {"id", "ctx", "score", "sem"}
    assert done.metrics.settings.seed == 5 and done.metrics.settings.iterations == 2


def test_int16_round_trip_stays_on_grid_within_budget(ch):
    audio = (speech(1.0) * 32767).astype(np.int16)
    h, data = header(audio, 16000, fast_settings(epsilon=0.004, step_size=0.002), encoding="int16")
    events, code, details = raw_protect(stub(ch), messages(h, data))
    assert code == grpc.StatusCode.OK, details
    raw = b"".join(e.result_chunk.pcm for e in events if e.WhichOneof("kind") == "result_chunk")
    out = np.frombuffer(raw, "<i2").astype(np.int64)
    d = np.abs(out - audio.astype(np.int64))
    assert d.max() <= int(0.004 * 32768) and d.max() > 0


def test_eight_concurrent_clients_all_correct_and_batched(server, models):
    audio = speech(1.0)
    seeds = list(range(8))
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    before = server.scheduler.stats["max_batch_seen"]

    def client(seed: int) -> None:
        try:
            with RemoteProtector(server.address, client_name=f"client-{seed}") as rp:
                results[seed] = rp.protect(audio, 16000, fast(seed=seed)).audio
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert server.scheduler.stats["max_batch_seen"] > 1 or before > 1  # cross-job batching happened
    for seed in seeds:
        cfg = fast(seed=seed)
        local = protect(audio, 16000, models, cfg).audio
        # batched convolutions round differently; sign-gradient PGD turns that into rare step flips
        diff = np.abs(results[seed].astype(np.float64) - local)
        assert diff.max() <= 2 * cfg.iterations * cfg.step_size + 1e-6
        assert np.mean(diff > 2e-6) < 0.01
    assert len({results[s].tobytes() for s in seeds}) == 8


def test_batched_server_matches_engine_batching(models):
    """max_batch=1 (no cross-job batching) gives exactly cloak.protect; the engine's batched run agrees."""
    audio = speech(1.0)
    jobs = [ProtectionJob(audio, 16000, models, fast(seed=s)) for s in (1, 2)]
    run_jobs(jobs, max_batch=2)
    with running(models, max_batch=1) as srv, RemoteProtector(srv.address) as rp:
        out = rp.protect(audio, 16000, fast(seed=1)).audio
    assert np.array_equal(out, protect(audio, 16000, models, fast(seed=1)).audio)
    np.testing.assert_allclose(out, jobs[0].result().audio, atol=2e-6)


# -------------------------------------------------------------------------------------- queue and jobs
def test_queue_full_is_resource_exhausted_with_retry_hint(models):
    with running(models, max_batch=1, max_queue=1) as srv, channel(srv) as c:
        s = stub(c)
        call_a, _, job_a = long_job(s)
        audio = speech(1.0)
        h, data = header(audio, 16000, fast_settings(iterations=5000))
        call_b = s.Protect(iter(messages(h, data)))
        first_b = next(iter(call_b)).event
        assert first_b.WhichOneof("kind") == "accepted" and first_b.accepted.queue_position == 1
        with RemoteProtector(srv.address) as rp:
            with pytest.raises(ServerUnavailable) as ei:
                rp.protect(audio, 16000, fast())
            assert ei.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in ei.value.details
            assert ei.value.retry_after is not None and ei.value.retry_after >= 1
            assert rp.cancel(first_b.job_id) == "CANCELLED"
            assert rp.job(first_b.job_id).state == "CANCELLED"
            assert rp.cancel(job_a) == "CANCELLED"
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0})
        for call in (call_a, call_b):
            with pytest.raises(grpc.RpcError) as ei:
                list(call)
            assert ei.value.code() == grpc.StatusCode.CANCELLED
        assert srv.metrics.value("cloak_jobs_total", {"outcome": "rejected_busy"}) == 1


def test_cancel_by_id_frees_the_job(ch, server):
    s = stub(ch)
    call, it, job_id = long_job(s)
    rec = server.scheduler.get(job_id)
    assert rec.job is not None
    assert s.Cancel(pb.CancelRequest(job_id=job_id), timeout=10).state == pb.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as ei:
        list(it)
    assert ei.value.code() == grpc.StatusCode.CANCELLED and "Cancel request" in ei.value.details()
    wait_for(lambda: rec not in server.scheduler.active)
    assert rec.job is None and rec.samples is None
    status = s.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).status
    assert status.state == pb.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as ei:
        s.Cancel(pb.CancelRequest(job_id="no-such-job"), timeout=10)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_disconnect_cancels_the_job_within_an_iteration(ch, server):
    s = stub(ch)
    call, it, job_id = long_job(s)
    rec = server.scheduler.get(job_id)
    done_before = rec.iterations_done
    call.cancel()  # the client goes away
    wait_for(lambda: rec.finished, timeout=10)
    assert rec.state == JobState.CANCELLED and rec.job is None and rec.samples is None
    assert rec.iterations_done <= done_before + 3
    wait_for(lambda: rec not in server.scheduler.active)


def test_deadline_is_honoured(models):
    audio = speech(1.0)
    h, data = header(audio, 16000, fast_settings(iterations=5000))
    with running(models) as srv, channel(srv) as c:
        s = stub(c)
        # no speed measured yet: accepted; the deadline passes while it runs and the job is dropped
        events, code, details = raw_protect(s, messages(h, data), timeout=2.0)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert kinds(events)[0] == "accepted"
        rec = srv.scheduler.get(events[0].job_id)
        wait_for(lambda: rec.finished, timeout=10)
        assert rec.state == JobState.CANCELLED and rec.job is None
        wait_for(lambda: srv.scheduler.snapshot()["active_jobs"] == 0)
        # now the speed is known: work that cannot finish before the deadline is refused up front
        assert srv.scheduler.sec_per_unit is not None
        events, code, details = raw_protect(s, messages(h, data), timeout=5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline is in" in details and not events
        assert srv.metrics.value("cloak_jobs_total", {"outcome": "rejected_deadline"}) == 1


def test_reattach_running_and_finished_job(ch, server, models):
    audio = speech(1.0)
    cfg = fast(iterations=6, seed=3)
    h, data = header(audio, 16000, fast_settings(iterations=6, seed=3), keep_on_disconnect=True)
    events, code, _ = raw_protect(stub(ch), messages(h, data), stop_after="accepted")
    job_id = events[0].job_id
    rec = server.scheduler.get(job_id)
    time.sleep(0.3)
    assert not rec.finished or rec.state == JobState.SUCCEEDED  # kept running after the drop
    progress = []
    with RemoteProtector(server.address) as rp:
        r1 = rp.attach(job_id, progress=progress.append)
        r2 = rp.attach(job_id)  # finished: the kept result again
        with pytest.raises(Exception, match="NOT_FOUND"):
            rp.attach("unknown-job-id", tries=1)
    local = protect(audio, 16000, models, cfg).audio
    assert np.array_equal(r1.audio, local) and np.array_equal(r2.audio, local)
    assert r1.sha256 == r2.sha256 and r1.job_id == job_id
    status = stub(ch).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).status
    assert status.state == pb.JOB_STATE_SUCCEEDED and status.expires_in_seconds > 0


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving(ch, server):
    s = stub(ch)
    for name, msgs, expect in bad_cases():
        events, code, details = raw_protect(s, msgs, timeout=300)  # never below the server's estimate
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert expect in details, (name, details)
        assert not events, name
    assert server.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}
    assert health_status(ch) == SERVING
    h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
    assert raw_protect(s, messages(h, data))[1] == grpc.StatusCode.OK


def test_remote_client_maps_bad_input_to_local_exceptions(server):
    with RemoteProtector(server.address) as rp:
        with pytest.raises(ConfigError, match="settings.wavlm|settings.id_encoders"):
            rp.protect(speech(0.5), 16000, fast(id_encoders=("wavlm",)))
        with pytest.raises(AudioError):
            rp.protect(np.zeros(100, np.float32), 16000, fast())  # too short: refused by the client already


_settings_st = st.builds(
    lambda eps, it, w, g, frames: dict(eps=eps, it=it, w=w, g=g, frames=frames),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.lists(st.floats(allow_nan=True, width=64), max_size=5),
    st.integers(0, 20),
    st.integers(0, 2**40),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(spec=_settings_st, rate=st.integers(0, 300_000), channels=st.integers(0, 12),
       encoding=st.integers(0, 4), sha_ok=st.booleans(), header_first=st.booleans(),
       chunks=st.lists(st.binary(max_size=2048), max_size=4), extra_header=st.booleans())
def test_fuzz_request_stream(ch, server, spec, rate, channels, encoding, sha_ok, header_first, chunks, extra_header):
    import hashlib

    data = b"".join(chunks)
    h = pb.ProtectHeader(sample_rate=rate, channels=channels, frames=spec["frames"], encoding=encoding,
                         sha256=hashlib.sha256(data).hexdigest() if sha_ok else "f" * 64)
    if spec["eps"] is not None:
        h.settings.epsilon = spec["eps"]
    if spec["it"] is not None:
        h.settings.iterations = spec["it"]
    h.settings.weights[:] = spec["w"]
    h.settings.gender = spec["g"]
    msgs = [pb.ProtectRequest(pcm=c) for c in chunks]
    if header_first:
        msgs.insert(0, pb.ProtectRequest(header=h))
    if extra_header:
        msgs.append(pb.ProtectRequest(header=h))
    events, code, details = raw_protect(stub(ch), msgs, timeout=20, stop_after="accepted")
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED), (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details and not events
    assert health_status(ch) == SERVING


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_endpoint(server, ch):
    h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
    assert raw_protect(stub(ch), messages(h, data))[1] == grpc.StatusCode.OK
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("cloak_queue_depth", "cloak_active_jobs", "cloak_job_seconds_bucket", "cloak_pgd_iterations_total",
                 "cloak_batch_size_bucket", "cloak_device_memory_bytes"):
        assert name in text, name
    assert server.metrics.value("cloak_jobs_total", {"outcome": "succeeded"}) >= 1
