"""clients.remote.RemoteProtector and `cloak protect --server` against an in-process server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_server_helpers import bundle_models, fast, one_thread, running, speech, wait_for

from clients.cli import main
from clients.remote import RemoteProtector
from cloak import Cancelled, CancelToken, protect
from server.events import JobState


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models_and_bundle(tmp_path_factory, corpus):
    return bundle_models(tmp_path_factory.mktemp("remote"))


@pytest.fixture(scope="module")
def server(models_and_bundle):
    with running(models_and_bundle[0], max_batch=2) as srv:
        yield srv


def test_progress_metrics_and_result_like_local(server, models_and_bundle):
    audio = speech(1.0)
    seen = []
    with RemoteProtector(server.address) as rp:
        info = rp.info()
        assert info.state == "SERVING" and info.defaults.iterations == 50
        r = rp.protect(audio, 16000, fast(seed=8), progress=seen.append)
    local = protect(audio, 16000, models_and_bundle[0], fast(seed=8))
    assert np.array_equal(r.audio, local.audio) and r.sample_rate == 16000
    assert [p.iteration for p in seen] == [1, 2] and set(seen[-1].losses) == {"id", "ctx", "score", "sem"}
    for key in ("snr_db", "linf", "losses_start", "losses_end", "iterations", "windows", "gender", "history"):
        assert key in r.metrics, key
    assert r.metrics["config"] == local.metrics["config"]
    assert r.metrics["snr_db"] == pytest.approx(local.metrics["snr_db"])


def test_cancel_token_stops_the_job_on_the_server(server):
    token = CancelToken()
    with RemoteProtector(server.address) as rp, pytest.raises(Cancelled):
        rp.protect(speech(1.0), 16000, fast(iterations=5000), progress=lambda p: token.cancel(), cancel=token)
    wait_for(lambda: server.scheduler.snapshot()["active_jobs"] == 0)
    cancelled = [r for r in server.scheduler.finished.values() if r.state == JobState.CANCELLED]
    assert cancelled and cancelled[-1].job is None


def test_full_queue_is_retried_after_the_servers_hint(models_and_bundle):
    with running(models_and_bundle[0], max_batch=1, max_queue=1) as srv:
        audio = speech(0.5)
        first_started = threading.Event()
        out: list = []

        def submit(iterations: int, started: threading.Event | None = None) -> None:
            with RemoteProtector(srv.address) as rp:
                cb = (lambda p: started.set()) if started else None
                out.append(rp.protect(audio, 16000, fast(iterations=iterations), progress=cb).audio)

        a = threading.Thread(target=submit, args=(12, first_started))
        a.start()
        assert first_started.wait(30)
        b = threading.Thread(target=submit, args=(1,))
        b.start()
        wait_for(lambda: srv.scheduler.snapshot()["queue_depth"] == 1)
        with RemoteProtector(srv.address) as rp:
            r = rp.protect(audio, 16000, fast(iterations=1), busy_retries=10)
        a.join(60)
        b.join(60)
        assert r.audio.shape == audio.shape and len(out) == 2
        assert srv.metrics.value("cloak_jobs_total", {"outcome": "rejected_busy"}) >= 1


@contextlib.contextmanager
def tcp_proxy(target_port: int) -> Iterator[tuple[int, threading.Event]]:
    """A loopback TCP forwarder; setting the event cuts every open connection once (new ones still work)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    cut = threading.Event()
    conns: list[socket.socket] = []
    stop = threading.Event()

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", target_port))
            conns.extend([c, u])
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=pump, args=(x, y), daemon=True).start()

    def cutter() -> None:
        while not stop.is_set():
            if cut.wait(0.05):
                for s in list(conns):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                conns.clear()
                cut.clear()

    threads = [threading.Thread(target=f, daemon=True) for f in (accept, cutter)]
    for t in threads:
        t.start()
    try:
        yield lsock.getsockname()[1], cut
    finally:
        stop.set()
        lsock.close()


def test_dropped_connection_reattaches_to_the_running_job(server, models_and_bundle):
    audio = speech(1.0)
    cfg = fast(iterations=8, seed=6)
    with tcp_proxy(server.port) as (port, cut), RemoteProtector(f"127.0.0.1:{port}", health_check=False) as rp:
        seen: list[int] = []

        def progress(p) -> None:
            seen.append(p.iteration)
            if len(seen) == 2:
                cut.set()  # the network drops mid-job

        r = rp.protect(audio, 16000, cfg, progress=progress)
    assert np.array_equal(r.audio, protect(audio, 16000, models_and_bundle[0], cfg).audio)
    rec = server.scheduler.get(r.job_id)
    assert rec.state == JobState.SUCCEEDED and rec.attaches >= 1  # it was followed again by id


def test_cli_remote_mode_json(server, tmp_path: Path, capsys):
    wav = tmp_path / "take.flac"
    sf.write(wav, speech(1.0), 16000, subtype="PCM_16")
    out = tmp_path / "out"
    assert main(["protect", str(wav), "-o", str(out), "--server", server.address, "--json", "--iterations", "1",
                 "--repeats", "1", "--t-adv", "2", "--source-frames", "32", "--gender", "male"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["ok"] and rec["device"] == "remote:cpu" and rec["iterations"] == 1
    assert rec["models"] and all(len(m["sha256"]) == 64 for m in rec["models"])
    stored, sr = sf.read(out / "take.cloaked.flac", dtype="float32")
    assert sr == 16000 and 0 < np.abs(stored - sf.read(wav, dtype="float32")[0]).max() <= 0.002 + 1e-9


def test_cli_remote_bad_settings_exit_2(server, tmp_path: Path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(0.5), 16000)
    assert main(["protect", str(wav), "--server", server.address, "--id-encoders", "ge2e,wavlm", "-q"]) == 2
    assert "settings.id_encoders" in capsys.readouterr().err
    assert not (tmp_path / "a.cloaked.wav").exists()
