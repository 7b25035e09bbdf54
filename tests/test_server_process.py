"""`cloak serve` as a real subprocess: bundle models, token auth, the CLI's remote mode, SIGTERM drain."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from conftest import make_bundle
from test_server_helpers import (
    channel,
    fast,
    fast_settings,
    header,
    health_status,
    messages,
    one_thread,
    raw_protect,
    speech,
    stub,
    token_file,
    wait_for,
)

from clients.cli import main
from clients.remote import RemoteProtector, ServerUnavailable

ROOT = Path(__file__).resolve().parents[1]
FAST_FLAGS = ["--iterations", "2", "--repeats", "1", "--t-adv", "2", "--source-frames", "32", "--gender", "male",
              "--seed", "4", "--threads", "1"]


class Served:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", *args], cwd=ROOT,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def first(self, event: str) -> dict | None:
        return next((e for e in self.events() if e.get("event") == event), None)


@contextlib.contextmanager
def served_tiny(tmp_path: Path) -> Iterator[tuple[Served, str]]:
    """A real `cloak serve` on 127.0.0.1 with the tiny test bundle (fp32, one thread, no batching), and its
    address; killed on exit."""
    srv = Served(["--listen", "127.0.0.1:0", "--models", str(make_bundle(tmp_path / "bundle")), "--threads", "1",
                  "--precision", "fp32", "--max-batch", "1"])
    try:
        listening = wait_for(lambda: srv.first("listening") or (srv.proc.poll() is not None and {"dead": True}),
                             timeout=60)
        assert "dead" not in listening, "\n".join(srv.lines)
        yield srv, f"127.0.0.1:{listening['port']}"
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)


def test_cloak_serve_subprocess_cli_remote_and_sigterm_drain(tmp_path, corpus, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle")
    tf = token_file(tmp_path)
    token = tf.read_text().strip()
    srv = Served(["--listen", "127.0.0.1:0", "--models", str(bundle), "--token-file", str(tf), "--threads", "1",
                  "--drain-timeout", "2", "--max-batch", "2"])
    try:
        listening = wait_for(lambda: srv.first("listening") or (srv.proc.poll() is not None and {"dead": True}),
                             timeout=60)
        assert "dead" not in listening, "\n".join(srv.lines)
        address = f"127.0.0.1:{listening['port']}"
        with channel(address) as ch:
            wait_for(lambda: _health(ch) == 1, timeout=60)
            # the CLI in remote mode (env target) gives the same file as the CLI protecting locally
            wav = tmp_path / "take.wav"
            sf.write(wav, speech(1.0, 22050), 22050, subtype="PCM_16")
            monkeypatch.setenv("CLOAK_SERVER", address)
            monkeypatch.setenv("CLOAK_TOKEN_FILE", str(tf))
            with one_thread():
                assert main(["protect", str(wav), "-o", str(tmp_path / "remote.wav"), "-q", *FAST_FLAGS]) == 0
                monkeypatch.delenv("CLOAK_SERVER")
                monkeypatch.delenv("CLOAK_TOKEN_FILE")
                assert main(["protect", str(wav), "-o", str(tmp_path / "local.wav"), "-q", "--models", str(bundle),
                             "--device", "cpu", *FAST_FLAGS]) == 0
            remote, _ = sf.read(tmp_path / "remote.wav", dtype="int16")
            local, _ = sf.read(tmp_path / "local.wav", dtype="int16")
            assert np.array_equal(remote, local) and not np.array_equal(remote, sf.read(wav, dtype="int16")[0])

            # SIGTERM while a job runs: health NOT_SERVING, new jobs UNAVAILABLE, the running job ends clearly
            errors: list[BaseException] = []
            started = threading.Event()

            def long_job() -> None:
                with RemoteProtector(address, token=token) as rp:
                    try:
                        rp.protect(speech(1.0), 16000, fast(iterations=5000), progress=lambda p: started.set(),
                                   keep_on_disconnect=False)
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

            t = threading.Thread(target=long_job)
            t.start()
            assert started.wait(60)
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _health(ch) == 2, timeout=10)
            h, data = header(speech(0.5), 16000, fast_settings(iterations=1))
            code = raw_protect(stub(ch), messages(h, data), metadata=(("authorization", f"Bearer {token}"),))[1]
            assert code == grpc.StatusCode.UNAVAILABLE
            t.join(30)
            assert len(errors) == 1 and isinstance(errors[0], ServerUnavailable), errors
            assert "shut down before the job finished" in str(errors[0])
        assert srv.proc.wait(30) == 0
        srv.reader.join(5)
        names = [e.get("event") for e in srv.events()]
        for name in ("listening", "models_loaded", "job_accepted", "job_started", "job_done", "draining",
                     "stopped"):
            assert name in names, (name, names)
        done = [e for e in srv.events() if e.get("event") == "job_done"]
        assert all(e.get("job_id") for e in done)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)


def _health(ch: grpc.Channel) -> int:
    try:
        return health_status(ch)
    except grpc.RpcError:
        return -1


def test_serve_refuses_unsafe_or_bad_flags(tmp_path, capsys):
    assert main(["serve", "--listen", "0.0.0.0:0"]) == 2
    assert "without TLS" in capsys.readouterr().err
    tf = token_file(tmp_path, mode=0o644)
    assert main(["serve", "--token-file", str(tf)]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--token-file", "--tls-ca"])
def test_remote_flags_need_a_server(tmp_path, flag, capsys, monkeypatch):
    monkeypatch.delenv("CLOAK_SERVER", raising=False)
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(0.5), 16000)
    f = tmp_path / "f"
    f.write_text("x" * 20)
    assert main(["protect", str(wav), flag, str(f)]) == 2
    assert "--server" in capsys.readouterr().err


def test_unreachable_server_exits_5(tmp_path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(0.5), 16000)
    t0 = time.monotonic()
    assert main(["protect", str(wav), "--server", "127.0.0.1:1", "-q"]) == 5
    assert "server unavailable" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "a.cloaked.wav").exists()


def test_serve_exits_4_when_the_models_do_not_load(tmp_path):
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "diffvc.pt").write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--listen", "127.0.0.1:0", "--models", str(bad)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 4, r.stderr
    assert "could not load the models" in r.stderr and '"event": "models_failed"' in r.stderr
