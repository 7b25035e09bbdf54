"""The Node example client (examples/node, @grpc/grpc-js from the proto alone) against a real `cloak serve` on
127.0.0.1: the audio it gets is bit for bit what the Python client gets, and it reads the contract's errors.

Needs node and `npm ci` in examples/node. Under CI (CI set) their absence fails the test; elsewhere it skips."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_server_helpers import fast, speech
from test_server_process import served_tiny

from clients.remote import RemoteProtector

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "node"
SETTINGS = dict(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="male", seed=11)
NODE_SETTINGS = {**SETTINGS, "gender": "GENDER_MALE"}  # ProtectSettings JSON: proto field names, enum value names


def _node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = f"the example's packages are not installed (run `npm ci` in {EXAMPLE})"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must run the Node example client")
        pytest.skip(missing)
    assert node is not None
    return node


def _run_node(node: str, address: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, str(EXAMPLE / "protect.js"), "--server", address, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=EXAMPLE)


def test_node_client_gets_the_python_clients_bytes(tmp_path, corpus):
    node = _node()
    with served_tiny(tmp_path) as (srv, address):
        audio = speech(0.6)
        pcm16 = np.round(audio * 32767).astype(np.int16)
        stereo = speech(0.5, 22050, channels=2)
        for name, samples, rate, subtype, encoding in (("int16", pcm16, 16000, "PCM_16", "int16"),
                                                       ("float", stereo, 22050, "FLOAT", "float32")):
            src = tmp_path / f"{name}.wav"
            sf.write(str(src), samples, rate, subtype=subtype)
            out = tmp_path / f"{name}-node.wav"
            r = _run_node(node, address, "--settings", json.dumps(NODE_SETTINGS), str(src), str(out))
            assert r.returncode == 0, r.stderr + "\n".join(srv.lines[-20:])
            summary = json.loads(r.stdout)
            got, got_rate = sf.read(str(out), dtype="int16" if encoding == "int16" else "float32")
            assert got_rate == rate and got.shape == samples.shape and sf.info(str(out)).subtype == subtype
            with RemoteProtector(address) as rp:
                ref = rp.protect(samples, rate, fast(**SETTINGS), encoding=encoding)
            assert summary["sha256"] == ref.sha256, name
            want = np.round(ref.audio * 32768).astype(np.int16) if encoding == "int16" else ref.audio
            assert np.array_equal(got, want), name
            assert not np.array_equal(got, samples), f"{name}: the output is the input"
            raw = got.astype("<i2" if encoding == "int16" else "<f4").tobytes()
            assert hashlib.sha256(raw).hexdigest() == ref.sha256
        # the deadline: after the jobs above the server has a time estimate, which the client used
        assert summary["estimated_seconds"] is not None and summary["estimated_seconds"] > 0
        # a bad setting: the client reads the BadRequest's field path from the status details
        bad = _run_node(node, address, "--settings", json.dumps({**NODE_SETTINGS, "epsilon": 0.5}), str(src),
                        str(tmp_path / "bad.wav"))
        assert bad.returncode == 2 and "invalid request: header.settings.epsilon: " in bad.stderr, bad.stderr
        # a deadline far below the estimate: refused up front, with the reason
        slow = _run_node(node, address, "--deadline", "1", "--settings",
                         json.dumps({**NODE_SETTINGS, "iterations": 5000}), str(src), str(tmp_path / "slow.wav"))
        assert slow.returncode == 4 and "ERROR_REASON_DEADLINE_TOO_SHORT" in slow.stderr, slow.stderr
        # a chunk over the server's 4 MiB message limit: gRPC's RESOURCE_EXHAUSTED, which is not retried
        long = tmp_path / "long.wav"
        sf.write(str(long), np.tile(stereo, (80, 1)), 22050, subtype="FLOAT")  # 40 s, 7 MB of PCM
        big = _run_node(node, address, "--chunk-bytes", str(5 << 20), "--retries", "5", "--settings",
                        json.dumps(NODE_SETTINGS), str(long), str(tmp_path / "big.wav"), timeout=60)
        assert big.returncode == 3 and "without RetryInfo" in big.stderr and "retrying" not in big.stderr, big.stderr
