"""Issue 16, in-process: what one token holder could do to the server (settings that protect nothing, idle
uploads, Cancel races, forged log lines, stream floods, memory, Cancel within a step) and what it gets now; other
users' jobs and refused calls are test_server_auth's."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from test_server_helpers import (  # noqa: F401 - fixtures are found by name (the autouse one, and arguments)
    ch_fixture,
    channel,
    fast_settings,
    header,
    kinds,
    messages,
    models_fixture,
    one_torch_thread,
    raw_protect,
    running,
    speech,
    stub,
    wait_for,
)

from server.events import JobState
from server.gen import cloak_service_pb2 as pb


@pytest.fixture(scope="module")
def server(models):
    with running(models, max_batch=2, max_queue=8) as srv:
        yield srv


def _with_settings(audio: np.ndarray, **kw) -> list[pb.ProtectRequest]:
    s = fast_settings(iterations=1)
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(s, k)[:] = v
        else:
            setattr(s, k, v)
    h, data = header(audio, 16000, s)
    return messages(h, data)


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("weights,losses,expect", [
    # four zeros leave L_voice at its default weight, which this test server's model (no prior) cannot run
    ([0.0, 0.0, 0.0, 0.0], [], "no enabled loss term applies to this server's model"),
    ([0.0, 0.0, 0.0, 0.0, 0.0], [], "no enabled loss term has a positive weight"),
    ([0.0, 1.0, 1.0, 1.0], [pb.LOSS_TERM_ID], "no enabled loss term has a positive weight"),
    ([1e308, 1.0, 1.0, 1.0], [], "settings.weights[0] (id)"),
    ([1.0, 1e200, 1.0, 1.0], [], "settings.weights[1] (ctx)"),
    ([1.0, 1.0, 5e-324, 1.0], [], "settings.weights[2] (score)"),
    ([1.0, 1.0, 1.0, float("inf")], [], "settings.weights[3] (sem) must be a finite number"),
    ([1.0, 1.0, float("nan"), 1.0], [], "settings.weights[2] (score) must be a finite number"),
    ([1.0, 1e6 * 1.0001, 1.0, 1.0], [], "must be 0 or in [1e-06, 1e+06]"),
])
def test_weights_that_protect_nothing_are_invalid_argument(ch, server, weights, losses, expect):
    events, code, details = raw_protect(stub(ch), _with_settings(speech(0.5), weights=weights, losses=losses))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert expect in details and details.startswith("settings.weights") and not events
    assert server.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}


@pytest.mark.parametrize("weights,losses", [
    ([1e6, 0.0, 0.0, 0.0], [pb.LOSS_TERM_ID]),
    ([1e-6, 0.0, 0.0, 0.0], [pb.LOSS_TERM_ID]),
    ([0.0, 0.0, 1e6, 0.0], []),
    ([0.0, 0.0, 1e-6, 0.0], []),
    ([1e6, 1e-6, 1e6, 1e-6], []),
])
def test_extreme_but_valid_weights_still_protect(ch, weights, losses):
    audio = speech(0.5)
    events, code, details = raw_protect(stub(ch), _with_settings(audio, weights=weights, losses=losses))
    assert code == grpc.StatusCode.OK, details
    m = events[-1].done.metrics
    assert m.linf > 0 and not m.warning and 0 < m.snr_db < 200, m


def test_silent_input_says_it_is_not_protected_instead_of_an_snr(ch):
    events, code, details = raw_protect(stub(ch), _with_settings(np.zeros(8000, np.float32)))
    assert code == grpc.StatusCode.OK, details
    assert kinds(events)[-1] == "done"
    m = events[-1].done.metrics
    assert m.linf == 0 and m.snr_db == 0
    assert m.warning.startswith("NOT PROTECTED") and "silent" in m.warning


# ------------------------------------------------------------------------------------- upload idle timeout
def stalling_upload(h: pb.ProtectHeader | None, chunks: list[bytes], stop: threading.Event,
                    empty_every: float | None = None, pause: float = 0.0, stall: bool = True):
    """A request stream: the header, `chunks` (each after `pause` s), then (with stall) nothing or empty chunks
    until stop."""
    if h is not None:
        yield pb.ProtectRequest(header=h)
    for c in chunks:
        if stop.wait(pause):
            return
        yield pb.ProtectRequest(pcm=c)
    while stall and not stop.wait(empty_every or 0.05):
        if empty_every:
            yield pb.ProtectRequest(pcm=b"")


def _timed_protect(s, reqs, timeout: float = 30.0):
    t0 = time.monotonic()
    call = s.Protect(reqs, timeout=timeout)
    events: list = []
    try:
        for r in call:
            events.append(r.event)
    except grpc.RpcError as e:
        return events, e.code(), e.details(), time.monotonic() - t0
    return events, grpc.StatusCode.OK, "", time.monotonic() - t0


def test_idle_uploads_end_deadline_exceeded_and_free_their_slot(models):
    audio = speech(0.5)
    h, data = header(audio, 16000, fast_settings(iterations=1))
    with running(models, max_batch=1, max_queue=1, upload_idle_timeout=1.0) as srv, channel(srv) as c:
        s = stub(c)
        stop = threading.Event()
        try:
            # nothing at all, not even a header
            _, code, details, took = _timed_protect(s, stalling_upload(None, [], stop))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no ProtectHeader for 1 s" in details
            assert 0.9 <= took < 5, took
            # a header and half the PCM, then silence; meanwhile the only queue slot is taken
            got: list = []
            t = threading.Thread(target=lambda: got.append(_timed_protect(s, stalling_upload(h, [data[:4000]], stop))))
            t.start()
            wait_for(lambda: srv.scheduler.snapshot()["queue_depth"] == 1)
            assert raw_protect(s, messages(h, data))[1] == grpc.StatusCode.RESOURCE_EXHAUSTED
            t.join(10)
            _, code, details, took = got[0]
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no PCM bytes for 1 s" in details, details
            assert "--upload-idle-timeout" in details and took < 5
            assert srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}  # the slot is free again
            assert raw_protect(s, messages(h, data))[1] == grpc.StatusCode.OK
            # empty chunks every 0.1 s are no progress
            _, code, details, took = _timed_protect(s, stalling_upload(h, [], stop, empty_every=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no PCM bytes" in details and took < 5
            # a slow upload that keeps sending bytes is fine: 4 chunks 0.5 s apart, 2 s in all
            q = len(data) // 4 + 1
            chunks = [data[i:i + q] for i in range(0, len(data), q)]
            events, code, details, took = _timed_protect(s, stalling_upload(h, chunks, stop, pause=0.5, stall=False))
            assert code == grpc.StatusCode.OK and kinds(events)[-1] == "done" and took >= 1.5, (code, details)
        finally:
            stop.set()
        assert srv.metrics.value("cloak_jobs_total", {"outcome": "rejected_idle"}) == 3
        assert srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0}


# ---------------------------------------------------------------------------------- stream caps, health
def _long_running(s, **kw) -> str:
    h, data = header(speech(1.0), 16000, fast_settings(iterations=5000), keep_on_disconnect=True, **kw)
    events, _, _ = raw_protect(s, messages(h, data), stop_after="started")
    return events[0].job_id


def health_seconds(c: grpc.Channel) -> float:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.monotonic()
    assert health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    return time.monotonic() - t0


def test_attach_and_protect_floods_are_capped_and_health_answers_within_a_second(models):
    with running(models, max_batch=2, max_queue=4, max_attach_per_job=4, max_attach_per_client=6,
                 max_attach=8, upload_idle_timeout=30) as srv, channel(srv) as c:
        s = stub(c)
        job = _long_running(s)
        # 80 Attach streams on one job: 4 stay open, 76 are refused at once with a retry hint
        calls = [s.Attach(pb.AttachRequest(job_id=job), timeout=60) for _ in range(80)]
        assert max(health_seconds(c) for _ in range(5)) < 1.0
        open_, refused = [], []
        for call in calls:
            try:
                next(iter(call))
                open_.append(call)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused.append(e.details())
        assert len(open_) == 4 and len(refused) == 76 and "--max-attach-per-job" in refused[0]
        assert srv.caps.attach == 4
        # the same client on a second job: its per-client cap (6) ends it at 2 more
        job2 = _long_running(s)
        more = [s.Attach(pb.AttachRequest(job_id=job2), timeout=60) for _ in range(5)]
        codes = []
        for call in more:
            try:
                next(iter(call))
                codes.append("open")
            except grpc.RpcError as e:
                codes.append(e.details())
        assert codes.count("open") == 2 and all("--max-attach-per-client" in x for x in codes if x != "open")
        # 60 Protect streams that never send a header: one identity holds at most half of the
        # max_queue + max_batch + 8 = 14 streams
        stop = threading.Event()
        stalled = [s.Protect(stalling_upload(None, [], stop), timeout=60) for _ in range(60)]
        t0 = time.monotonic()
        worst = max(health_seconds(c) for _ in range(10))
        info_t0 = time.monotonic()
        info = s.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        info_s = time.monotonic() - info_t0
        assert worst < 1.0 and info_s < 1.0 and info.limits.max_attach_per_job == 4, (worst, info_s)
        wait_for(lambda: srv.caps.protect == 7, timeout=10)
        wait_for(lambda: sum(x.done() and x.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for x in stalled) == 53)
        assert time.monotonic() - t0 < 10
        stop.set()
        for call in [*stalled, *open_, *more]:
            call.cancel()
        for j in (job, job2):
            s.Cancel(pb.CancelRequest(job_id=j), timeout=10)
        wait_for(lambda: srv.caps.attach == 0 and srv.caps.protect == 0, timeout=10)
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0})


# ------------------------------------------------------------------------------------------------- Cancel
def test_cancel_reports_the_state_the_job_really_ends_in(server, ch):
    """Cancel at every moment of short jobs' lives; the answer always matches what the stream delivered."""
    s = stub(ch)
    seen = set()
    for i in range(12):
        h, data = header(speech(0.5), 16000, fast_settings(iterations=3, seed=i))
        call = s.Protect(iter(messages(h, data)), timeout=60)
        events, answer, delivered = [], None, False
        try:
            for r in call:
                events.append(r.event)
                kind = r.event.WhichOneof("kind")
                # the i-th event of the stream (accepted, started, progress 1..3, result, done) triggers the Cancel
                if answer is None and len(events) == 1 + i % 6:
                    answer = s.Cancel(pb.CancelRequest(job_id=r.event.job_id), timeout=20).state
                delivered = delivered or kind == "done"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED, e
        if answer is None:  # the stream ended before the chosen event: cancel the finished job
            answer = s.Cancel(pb.CancelRequest(job_id=events[0].job_id), timeout=20).state
        final = s.GetJob(pb.GetJobRequest(job_id=events[0].job_id), timeout=10).status.state
        assert answer == final, (i, answer, final)
        assert (final == pb.JOB_STATE_SUCCEEDED) == delivered, (i, final, delivered)
        seen.add(final)
    assert seen == {pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED}


def test_cancel_of_a_pruned_job_is_no_key_error(models):
    with running(models, max_results=1) as srv, channel(srv) as c:
        s = stub(c)
        ids = []
        for seed in (1, 2):
            h, data = header(speech(0.5), 16000, fast_settings(iterations=1, seed=seed))
            events, code, _ = raw_protect(s, messages(h, data))
            assert code == grpc.StatusCode.OK
            ids.append(events[0].job_id)
        assert srv.scheduler.get(ids[0]) is None  # pruned: only one result is kept
        rec = srv.scheduler.get(ids[1])
        srv.scheduler._prune = lambda: None  # noqa: SLF001
        srv.scheduler.jobs.pop(ids[1])  # as if pruning ran between the Cancel's lookup and its action
        assert srv.scheduler.cancel_record(rec, "test") == JobState.SUCCEEDED
        with pytest.raises(grpc.RpcError) as ei:
            s.Cancel(pb.CancelRequest(job_id=ids[0]), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------------------------------- logs
def test_text_logs_escape_control_characters_so_no_line_can_be_forged():
    import io
    import logging

    from server import logs

    buf = io.StringIO()
    log = logs.setup("text", stream=buf)
    try:
        logs.event("job_accepted", client="me\n12:00:00 info job_done job_id=forged", peer="ipv4:127.0.0.1:1",
                   note="a=b c", bell="\x07\x1b[2J", sep="\u2028x", n=3)
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    text = buf.getvalue()
    assert text.count("\n") == 1 and "\r" not in text and "\x1b" not in text and "\u2028" not in text
    line = text.rstrip("\n")
    assert 'client="me\\n12:00:00 info job_done job_id=forged"' in line
    assert "peer=ipv4:127.0.0.1:1" in line and 'note="a=b c"' in line and "n=3" in line


# ------------------------------------------------------------------------------------------ memory budget
def test_memory_budget_refuses_what_never_fits_and_defers_what_does_not_fit_now(models):
    from clients.remote import retry_after_seconds
    from server import memory

    budget = 300 << 20
    h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
    with running(models, memory_budget=budget, upload_idle_timeout=2.0, max_results=4) as srv, channel(srv) as c:
        s = stub(c)
        assert s.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).limits.memory_budget_bytes == budget
        est = srv.scheduler.memory_estimate(pcm_upload(h))
        assert 2 * est.peak <= budget < 3 * est.peak, est  # two such jobs fit, a third does not
        # a clip whose job can never fit: refused before any byte, naming the field
        big = pb.ProtectHeader()
        big.CopyFrom(h)
        big.sample_rate, big.channels, big.frames = 48000, 8, 48000 * 120
        events, code, details = raw_protect(s, [pb.ProtectRequest(header=big)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("header.frames") and not events
        assert "--memory-budget is 300.0 MiB" in details
        many = pb.ProtectHeader()
        many.CopyFrom(h)
        many.settings.repeats = 64
        events, code, details = raw_protect(s, [pb.ProtectRequest(header=many)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("settings.repeats"), details
        # two uploads that stall hold the budget; a third is told to come back later
        stop = threading.Event()
        stalled = [s.Protect(stalling_upload(h, [data[:1000]], stop), timeout=30) for _ in range(2)]
        wait_for(lambda: srv.scheduler.memory.used == 2 * est.peak)
        call = s.Protect(iter(messages(h, data)), timeout=30)
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "not enough memory" in ei.value.details()
        assert retry_after_seconds(ei.value) is not None
        assert srv.metrics.value("cloak_jobs_total", {"outcome": "rejected_memory"}) == 1
        for x in stalled:  # the idle timeout gives their memory back
            with pytest.raises(grpc.RpcError):
                list(x)
        stop.set()
        assert srv.scheduler.memory.used == 0
        events, code, _ = raw_protect(s, messages(h, data))
        assert code == grpc.StatusCode.OK
        rec = srv.scheduler.get(events[0].job_id)
        # a finished job holds only its kept result, and kept results make room for new work
        assert srv.scheduler.memory.used == len(rec.result_pcm) == rec.mem
        srv.scheduler.memory.used = budget - est.peak + 1  # as if other work held nearly all of it
        held_before = srv.scheduler.memory.used
        assert srv.scheduler.take_memory(est.peak)
        assert srv.scheduler.get(rec.id) is None  # the result was dropped to make room
        assert srv.scheduler.memory.used == held_before - len(rec.result_pcm) + est.peak
        srv.scheduler.memory.used = 0
    assert memory.fmt(3 << 30) == "3.0 GiB"


def pcm_upload(h: pb.ProtectHeader):
    from server import pcm

    return pcm.validate_header(h, pcm.Limits())


# ------------------------------------------------------------------------------ cancellation within a step
def _slow_settings(**kw) -> pb.ProtectSettings:
    """Settings whose every PGD iteration takes seconds even on the tiny model (repeats 32)."""
    return fast_settings(**{"iterations": 3, "repeats": 32, **kw})


def _until_progress(call) -> str:
    for r in call:
        if r.event.WhichOneof("kind") == "progress":
            return r.event.job_id
    raise AssertionError("no progress")


def test_cancel_and_drain_stop_a_slow_iteration_within_a_block_not_an_iteration(models):
    audio = speech(3.0)
    with running(models, max_batch=1) as srv, channel(srv) as c:
        s = stub(c)
        # how long one iteration takes with these settings (measured here, on this machine's load)
        h, data = header(audio, 16000, _slow_settings(seed=1))
        events, code, _ = raw_protect(s, messages(h, data), timeout=None)
        assert code == grpc.StatusCode.OK
        times = [e.progress.elapsed_seconds for e in events if e.WhichOneof("kind") == "progress"]
        iteration_s = min(b - a for a, b in zip(times, times[1:], strict=False))
        assert iteration_s > 1.0, times
        # Cancel in the middle of an iteration: the job ends long before the iteration would have
        h, data = header(audio, 16000, _slow_settings(seed=2, iterations=50))
        call = s.Protect(iter(messages(h, data)))
        job = _until_progress(call)
        time.sleep(iteration_s / 4)
        t0 = time.monotonic()
        state = s.Cancel(pb.CancelRequest(job_id=job), timeout=30).state
        cancel_s = time.monotonic() - t0
        assert state == pb.JOB_STATE_CANCELLED and cancel_s < iteration_s / 2, (cancel_s, iteration_s)
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == grpc.StatusCode.CANCELLED
        # drain with a short timeout while a slow job runs: it returns within the timeout plus a block
        h, data = header(audio, 16000, _slow_settings(seed=3, iterations=50))
        call = s.Protect(iter(messages(h, data)))
        _until_progress(call)
        time.sleep(iteration_s / 4)
        t0 = time.monotonic()
        srv.drain(timeout=0.2)
        drain_s = time.monotonic() - t0
        assert drain_s < 0.2 + iteration_s / 2, (drain_s, iteration_s)
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "drain timeout" in ei.value.details()
    print(f"iteration {iteration_s:.2f} s; Cancel answered after {cancel_s:.2f} s, drain(0.2) took {drain_s:.2f} s")


def test_a_cancelled_jobs_batch_mate_runs_on(models):
    audio = speech(1.0)
    with running(models, max_batch=2) as srv, channel(srv) as c:
        s = stub(c)
        h1, d1 = header(audio, 16000, _slow_settings(seed=4, iterations=50))
        call1 = s.Protect(iter(messages(h1, d1)))
        job1 = _until_progress(call1)
        h2, d2 = header(audio, 16000, _slow_settings(seed=5, iterations=2))
        got: list = []
        t = threading.Thread(target=lambda: got.append(raw_protect(s, messages(h2, d2), timeout=None)))
        t.start()
        wait_for(lambda: srv.scheduler.stats["max_batch_seen"] == 2, timeout=60)
        assert s.Cancel(pb.CancelRequest(job_id=job1), timeout=30).state == pb.JOB_STATE_CANCELLED
        t.join(120)
        events, code, details = got[0]
        assert code == grpc.StatusCode.OK and kinds(events)[-1] == "done", details


def test_memory_budget_flag_takes_bytes_and_units(capsys):
    from clients.cli import main
    from server.config import ServerConfigError, parse_size

    assert parse_size("536870912") == 512 << 20 == parse_size("512MiB") == parse_size("512 mib")
    assert parse_size("8GiB") == 8 << 30 and parse_size("2GB") == 2_000_000_000 and parse_size("1.5GiB") == 3 << 29
    for bad in ("", "12XB", "-1GiB", "GiB", "1e9"):
        with pytest.raises(ServerConfigError, match="not a size"):
            parse_size(bad)
    assert main(["serve", "--memory-budget", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
    assert main(["serve", "--memory-budget", "1MiB"]) == 2
    assert "at least 16MiB" in capsys.readouterr().err
