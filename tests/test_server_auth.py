"""Who may use the in-process server: a token, named tokens (identities that own their jobs and share the running
slots fairly), TLS for gRPC and metrics, safe listen addresses, and rate-limited logs of refused calls."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from test_server_helpers import (  # noqa: F401 - fixtures are found by name (the autouse one, and arguments)
    SERVING,
    channel,
    fast,
    fast_settings,
    header,
    health_status,
    make_tls,
    messages,
    models_fixture,
    one_torch_thread,
    raw_protect,
    running,
    speech,
    stub,
    token_file,
    wait_for,
)

from clients.remote import RemoteProtector, ServerUnavailable
from server.config import ServerConfig, ServerConfigError, is_loopback, split_listen
from server.events import JobState
from server.gen import cloak_service_pb2 as pb


# ---------------------------------------------------------------------------- token, TLS, listen address
def test_token_auth(models, tmp_path):
    tf = token_file(tmp_path)
    with running(models, token_file=str(tf)) as srv, channel(srv) as c:
        s = stub(c)
        for md in ((), (("authorization", "Bearer wrong-token-000000000"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as ei:
                s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md, timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            h, data = header(speech(0.5), 16000)
            assert raw_protect(s, messages(h, data), metadata=md)[1] == grpc.StatusCode.UNAUTHENTICATED
        assert health_status(c) == SERVING  # health needs no token
        ok = (("authorization", "Bearer s3cret-token-0123456789"),)
        assert s.GetServerInfo(pb.GetServerInfoRequest(), metadata=ok, timeout=10).state == pb.SERVING_STATE_SERVING
        with RemoteProtector(srv.address, token="s3cret-token-0123456789") as rp:
            assert rp.protect(speech(0.5), 16000, fast(iterations=1)).audio.shape == (8000,)
        with RemoteProtector(srv.address) as rp, pytest.raises(ServerUnavailable, match="UNAUTHENTICATED"):
            rp.info()
        assert srv.rejected_auth >= 7
    with pytest.raises(ServerConfigError, match="chmod 600"):
        ServerConfig(token_file=str(token_file(tmp_path, mode=0o644))).check()


def test_tls_round_trip_with_a_certificate_made_here(models, tmp_path):
    ca, cert, key = make_tls(tmp_path)
    tf = token_file(tmp_path)
    with running(models, listen="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key), token_file=str(tf)) as srv:
        target = f"localhost:{srv.port}"
        with RemoteProtector(target, token=tf.read_text().strip(), tls_ca=ca) as rp:
            audio = speech(0.5)
            r = rp.protect(audio, 16000, fast(iterations=1, seed=2))
            assert r.audio.shape == audio.shape and 0 < np.abs(r.audio - audio).max() <= 0.002 + 1e-7
        with RemoteProtector(target, token="x" * 20) as rp, pytest.raises(ServerUnavailable):
            rp.info(timeout=3)  # plain-text client against a TLS server


def test_listen_address_safety():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("unix")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert split_listen("[::1]:50051") == ("::1", 50051) and split_listen("unix:/tmp/x.sock") == ("unix", None)
    with pytest.raises(ServerConfigError, match="without TLS"):
        ServerConfig(listen="0.0.0.0:50051").check()
    ServerConfig(listen="0.0.0.0:50051", insecure=True).check()
    with pytest.raises(ServerConfigError, match="go together"):
        ServerConfig(tls_cert="x.pem").check()
    with pytest.raises(ServerConfigError, match="max-batch"):
        ServerConfig(max_batch=0).check()


# ------------------------------------------------------------------------ refused calls, metrics over TLS
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
        wait_for(lambda: srv.scheduler.get(b).state == JobState.RUNNING)
        assert srv.scheduler.get(queued_a).state == JobState.QUEUED
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
        assert [r.id for r in paused] == [a[1]] and paused[0].state == JobState.RUNNING
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
