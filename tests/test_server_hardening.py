"""Issue 16, in-process: what one token holder could do to the server (settings that protect nothing, idle
uploads, Cancel races, forged log lines, stream floods, other users' jobs, memory) and what it gets now."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from test_server_helpers import (
    bundle_models,
    channel,
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

from server.gen import cloak_service_pb2 as pb


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    return bundle_models(tmp_path_factory.mktemp("hardening"))[0]


@pytest.fixture(scope="module")
def server(models):
    with running(models, max_batch=2, max_queue=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def ch(server):
    c = channel(server)
    yield c
    c.close()


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
        assert srv.scheduler.cancel_record(rec, "test") == pb.JOB_STATE_SUCCEEDED
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


def test_unauthenticated_flood_is_logged_rate_limited_with_the_peer(models, tmp_path, caplog):
    import logging

    from test_server_helpers import token_file

    tf = token_file(tmp_path)
    with running(models, token_file=str(tf)) as srv, channel(srv) as c:
        s = stub(c)
        caplog.set_level(logging.INFO, logger="cloak.server")

        def spray(n: int) -> None:
            for _ in range(n):
                with pytest.raises(grpc.RpcError):
                    s.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("authorization", "Bearer wrong"),),
                                    timeout=10)

        threads = [threading.Thread(target=spray, args=(50,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert srv.rejected_auth == 400
        lines = [r for r in caplog.records if r.getMessage() == "unauthenticated"]
        assert 1 <= len(lines) <= 2, len(lines)  # one line per peer host per 10 s
        assert lines[0].fields["peer"].startswith("ipv4:127.0.0.1:") and lines[0].fields["suppressed"] == 0
        srv._reject_log.interval = 0.2  # noqa: SLF001 - the next window opens sooner
        time.sleep(0.3)
        spray(1)
        last = [r for r in caplog.records if r.getMessage() == "unauthenticated"][-1]
        assert last.fields["suppressed"] == 400 - len(lines)  # what was held back is reported with the next line


def test_metrics_on_a_non_loopback_address_need_tls_or_insecure(tmp_path):
    import ssl
    import urllib.request

    from test_server_helpers import make_tls

    from server.config import ServerConfig, ServerConfigError
    from server.metrics import Metrics

    with pytest.raises(ServerConfigError, match="refusing to serve metrics on 0.0.0.0 without TLS"):
        ServerConfig(metrics_port=9464, metrics_addr="0.0.0.0").check()
    ServerConfig(metrics_port=9464, metrics_addr="0.0.0.0", insecure=True).check()
    ServerConfig(metrics_port=9464, metrics_addr="127.0.0.1").check()
    ca, cert, key = make_tls(tmp_path)
    ServerConfig(metrics_port=9464, metrics_addr="0.0.0.0", tls_cert=str(cert), tls_key=str(key)).check()
    # with TLS the endpoint speaks HTTPS with the server's certificate (tried on loopback)
    m = Metrics()
    port = m.serve_http(0, "127.0.0.1", certfile=str(cert), keyfile=str(key))
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        body = urllib.request.urlopen(f"https://localhost:{port}/metrics", timeout=10, context=ctx).read().decode()
        assert "cloak_queue_depth" in body
        with pytest.raises(Exception):  # noqa: B017 - plain HTTP gets no answer from a TLS endpoint
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        m.close()


# ------------------------------------------------------------------------------------------ named tokens
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdefgh"


def _tokens_file(tmp_path, text: str, mode: int = 0o600):
    p = tmp_path / "tokens"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_tokens_file_is_checked(tmp_path):
    from server.config import ServerConfig, ServerConfigError, load_tokens

    good = _tokens_file(tmp_path, f"# users\nalice {ALICE}\n\nbob   {BOB}\n")
    assert load_tokens(good) == {ALICE: "alice", BOB: "bob"}
    for text, match in ((f"alice {ALICE}\nbob {ALICE}\n", "same token"), (f"alice {ALICE}\nalice {BOB}\n", "twice"),
                        ("alice short\n", "too short"), (f"al ice {ALICE}\n", "NAME TOKEN"), ("# none\n", "no 'NAME")):
        with pytest.raises(ServerConfigError, match=match):
            load_tokens(_tokens_file(tmp_path, text))
    with pytest.raises(ServerConfigError, match="chmod 600"):
        load_tokens(_tokens_file(tmp_path, f"alice {ALICE}\n", mode=0o640))
    from test_server_helpers import token_file

    with pytest.raises(ServerConfigError, match="exclude each other"):
        ServerConfig(tokens_file=str(good), token_file=str(token_file(tmp_path))).check()


def test_named_tokens_own_their_jobs_and_share_running_slots_fairly(models, tmp_path, caplog):
    import logging

    tf = _tokens_file(tmp_path, f"alice {ALICE}\nbob {BOB}\n")
    release = threading.Event()

    def loader():
        release.wait(30)
        return models

    caplog.set_level(logging.INFO, logger="cloak.server")
    with running(loader=loader, max_batch=2, max_queue=8, tokens_file=str(tf)) as srv, channel(srv) as c:
        s = stub(c)
        md = {name: (("authorization", f"Bearer {tok}"),) for name, tok in (("alice", ALICE), ("bob", BOB))}
        release.set()
        srv.wait_ready(30)

        def submit(who: str, seed: int, name: str) -> str:
            h, data = header(speech(0.5), 16000, fast_settings(iterations=5000, seed=seed), keep_on_disconnect=True,
                             client_name=name)
            events, _, _ = raw_protect(s, messages(h, data), metadata=md[who], stop_after="accepted", timeout=None)
            return events[0].job_id

        # alice alone takes both running slots (nobody else waits), renaming her client each time
        a = [submit("alice", i, f"alice-laptop-{i}") for i in range(3)]
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 1, "active_jobs": 2})
        b = submit("bob", 9, "alice-laptop-0")  # bob cannot pass as alice by naming his client like hers
        state = {j: s.GetJob(pb.GetJobRequest(job_id=j), metadata=md["alice"], timeout=5).status.state for j in a}
        assert sorted(state.values()) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_RUNNING]
        # only the owner sees, follows or cancels a job
        for call, req in ((s.GetJob, pb.GetJobRequest(job_id=a[0])), (s.Cancel, pb.CancelRequest(job_id=a[0]))):
            with pytest.raises(grpc.RpcError) as ei:
                call(req, metadata=md["bob"], timeout=5)
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as ei:
            next(iter(s.Attach(pb.AttachRequest(job_id=a[0]), metadata=md["bob"], timeout=5)))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        first = next(iter(s.Attach(pb.AttachRequest(job_id=b), metadata=md["bob"], timeout=5)))
        assert first.event.job_id == b
        # bob is below his share (1 of 2): his job runs (one of alice's is paused for it), not alice's older
        # queued one, and stays running when one of alice's ends
        running_a = [j for j in a if state[j] == pb.JOB_STATE_RUNNING]
        queued_a = next(j for j in a if state[j] == pb.JOB_STATE_QUEUED)
        assert s.Cancel(pb.CancelRequest(job_id=running_a[0]), metadata=md["alice"],
                        timeout=20).state == pb.JOB_STATE_CANCELLED
        wait_for(lambda: srv.scheduler.get(b).state == pb.JOB_STATE_RUNNING)
        assert srv.scheduler.get(queued_a).state == pb.JOB_STATE_QUEUED
        for j in (running_a[1], queued_a):
            s.Cancel(pb.CancelRequest(job_id=j), metadata=md["alice"], timeout=20)
        s.Cancel(pb.CancelRequest(job_id=b), metadata=md["bob"], timeout=20)
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0})
        assert srv.metrics.value("cloak_identity_jobs_total", {"identity": "alice", "outcome": "cancelled"}) == 3
        assert srv.metrics.value("cloak_identity_jobs_total", {"identity": "bob", "outcome": "cancelled"}) == 1
        accepted = [r.fields for r in caplog.records if r.getMessage() == "job_accepted"]
        assert [f["client"] for f in accepted] == ["alice"] * 3 + ["bob"]
        assert accepted[-1]["client_name"] == "alice-laptop-0"
        # an unknown token is refused; health needs none
        with pytest.raises(grpc.RpcError) as ei:
            s.GetServerInfo(pb.GetServerInfoRequest(), metadata=(("authorization", "Bearer x" * 3),), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


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


def test_an_identity_above_its_share_is_paused_while_another_waits(models, tmp_path):
    tf = _tokens_file(tmp_path, f"alice {ALICE}\nbob {BOB}\n")
    with running(models, max_batch=2, max_queue=8, tokens_file=str(tf)) as srv, channel(srv) as c:
        s = stub(c)
        md = {name: (("authorization", f"Bearer {tok}"),) for name, tok in (("alice", ALICE), ("bob", BOB))}

        def submit(who: str, seed: int) -> str:
            h, data = header(speech(0.5), 16000, fast_settings(iterations=5000, seed=seed), keep_on_disconnect=True)
            events, _, _ = raw_protect(s, messages(h, data), metadata=md[who], stop_after="accepted", timeout=None)
            return events[0].job_id

        a = [submit("alice", i) for i in range(2)]
        wait_for(lambda: all(srv.scheduler.get(j).iterations_done > 0 for j in a), timeout=30)
        b = submit("bob", 9)
        # bob does not wait for one of alice's long jobs to end: her latest one is paused, his starts
        wait_for(lambda: srv.scheduler.get(b).iterations_done > 0, timeout=30)
        paused = [r for r in srv.scheduler.parked]
        assert [r.id for r in paused] == [a[1]] and paused[0].state == pb.JOB_STATE_RUNNING
        done = paused[0].iterations_done
        time.sleep(0.5)
        assert paused[0].iterations_done == done  # not stepped while paused
        assert s.GetJob(pb.GetJobRequest(job_id=a[1]), metadata=md["alice"], timeout=5).status.state == \
            pb.JOB_STATE_RUNNING
        # bob's job ends: alice's paused job resumes where it stopped
        assert s.Cancel(pb.CancelRequest(job_id=b), metadata=md["bob"], timeout=20).state == pb.JOB_STATE_CANCELLED
        wait_for(lambda: srv.scheduler.get(a[1]).iterations_done > done, timeout=30)
        assert not srv.scheduler.parked
        # a paused job can be cancelled too
        b2 = submit("bob", 10)
        wait_for(lambda: [r.id for r in srv.scheduler.parked] == [a[1]], timeout=30)
        assert s.Cancel(pb.CancelRequest(job_id=a[1]), metadata=md["alice"], timeout=20).state == \
            pb.JOB_STATE_CANCELLED
        for j, who in ((a[0], "alice"), (b2, "bob")):
            s.Cancel(pb.CancelRequest(job_id=j), metadata=md[who], timeout=20)
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0})
        assert srv.scheduler.memory.used == 0
