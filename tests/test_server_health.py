"""Health and liveness of the in-process server: health through loading, serving and draining; replicas behind a
round-robin balancer that follows health; heartbeats on a stream whose job waits."""

from __future__ import annotations

import threading
import time

import grpc
from test_server_helpers import (  # noqa: F401 - fixtures are found by name (the autouse one, and arguments)
    NOT_SERVING,
    SERVING,
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
    running,
    speech,
    stub,
    wait_for,
)

from clients.remote import RemoteProtector
from server.gen import cloak_service_pb2 as pb


# ------------------------------------------------------------------------------------------------ health
def test_health_transitions_loading_serving_draining(models):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return models

    with running(loader=slow_loader) as srv, channel(srv) as c:
        s = stub(c)
        assert health_status(c) == NOT_SERVING
        assert s.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).state == pb.SERVING_STATE_LOADING
        h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
        got: list = []
        t = threading.Thread(target=lambda: got.append(raw_protect(s, messages(h, data))))
        t.start()
        wait_for(lambda: srv.scheduler.snapshot()["queue_depth"] == 1)
        release.set()
        wait_for(lambda: health_status(c) == SERVING)
        t.join(60)
        events, code, _ = got[0]
        assert code == grpc.StatusCode.OK
        assert kinds(events)[:2] == ["accepted", "queued"] and events[1].queued.models_loading
        srv.drain(timeout=1)
        assert health_status(c) == NOT_SERVING
        assert raw_protect(s, messages(h, data))[1] == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------- load balancing
def test_two_replicas_behind_round_robin_both_receive_work(models):
    from grpc_health.v1 import health_pb2

    with running(models) as a, running(models) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        audio = speech(0.5)
        with RemoteProtector(target) as rp:
            rp.wait_ready()
            time.sleep(0.3)  # let both subchannels connect and pass their health check
            for seed in range(10):
                rp.protect(audio, 16000, fast(iterations=1, seed=seed))
                if seed >= 3 and a.scheduler.stats["succeeded"] and b.scheduler.stats["succeeded"]:
                    break
            assert a.scheduler.stats["succeeded"] >= 1 and b.scheduler.stats["succeeded"] >= 1
            # health checking: a replica that reports NOT_SERVING gets no new work
            for name in ("", "cloak.v1.CloakService"):
                b.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            time.sleep(1.0)  # the client's health watch hears it
            before_a, before_b = a.scheduler.stats["succeeded"], b.scheduler.stats["succeeded"]
            for seed in range(3):
                rp.protect(audio, 16000, fast(iterations=1, seed=seed))
            assert b.scheduler.stats["succeeded"] == before_b and a.scheduler.stats["succeeded"] == before_a + 3


# -------------------------------------------------------------------------------------------- heartbeats
def test_queued_stream_gets_heartbeats(models, monkeypatch):
    import server.service

    monkeypatch.setattr(server.service, "HEARTBEAT_S", 0.2)
    with running(models, max_batch=1) as srv, channel(srv) as c:
        s = stub(c)
        call_a, _, job_a = long_job(s)
        h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
        call_b = s.Protect(iter(messages(h, data)))
        got = []
        for r in call_b:
            got.append(r.event)
            if len(got) == 4:
                break
        assert got[0].WhichOneof("kind") == "accepted" and len({e.job_id for e in got}) == 1
        # the same state again while nothing changes, marked as a heartbeat
        assert not got[0].heartbeat and all(e.heartbeat and e.accepted == got[0].accepted for e in got[1:])
        call_a.cancel()
        call_b.cancel()
        wait_for(lambda: srv.scheduler.snapshot() == {"queue_depth": 0, "active_jobs": 0})
