"""The shell wire recipe (examples/shell/protect_raw.sh, docs/contract.md) against a real `cloak serve`: raw PCM
in, JSON over gRPC with reflection (`buf curl`, the grpcurl stand-in CI has), the protected PCM out, bit for bit
what the Python client gets.

Needs buf and jq. Under CI (CI set) their absence fails the test; elsewhere it skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_server_helpers import fast, speech
from test_server_process import served_tiny

from clients.remote import RemoteProtector

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "shell" / "protect_raw.sh"
SETTINGS = dict(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="male", seed=5)
WIRE_SETTINGS = {**SETTINGS, "gender": "GENDER_MALE"}  # ProtectSettings JSON: proto field names, enum value names


def _tools() -> None:
    missing = [t for t in ("buf", "jq") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed; CI must run the shell wire recipe")
        pytest.skip(f"{', '.join(missing)} not installed")


def _recipe(address: str, rate: int, channels: int, src: Path, out: Path, settings: str,
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOAK_CURL": "buf"}
    return subprocess.run(["bash", str(SCRIPT), address, str(rate), str(channels), str(src), str(out), settings],
                          capture_output=True, text=True, timeout=300, env=env)


def test_shell_recipe_gets_the_python_clients_samples(tmp_path):
    _tools()
    with served_tiny(tmp_path) as (srv, address):
        samples = np.round(speech(0.6, 22050, channels=2) * 32767).astype(np.int16)
        src = tmp_path / "take.raw"
        samples.astype("<i2").tofile(src)
        out = tmp_path / "protected.raw"
        r = _recipe(address, 22050, 2, src, out, json.dumps(WIRE_SETTINGS))
        assert r.returncode == 0, r.stderr + "\n".join(srv.lines[-20:])
        metrics = json.loads(r.stdout.strip().splitlines()[-1])
        assert 0 < metrics["linf"] <= 0.002 + 1 / 32768
        got = np.fromfile(out, "<i2").reshape(-1, 2)
        with RemoteProtector(address) as rp:
            ref = rp.protect(samples, 22050, fast(**SETTINGS), encoding="int16")
        assert np.array_equal(got, np.round(ref.audio * 32768).astype(np.int16))
        assert not np.array_equal(got, samples)

        # a field the server refuses: the script fails, writes nothing, and the status names the field
        bad = tmp_path / "bad.raw"
        r = _recipe(address, 22050, 2, src, bad, json.dumps({**WIRE_SETTINGS, "epsilon": 5}))
        assert r.returncode != 0 and not bad.exists()
        assert "epsilon" in r.stderr
        # not whole frames: refused by the script before anything is sent
        odd = tmp_path / "odd.raw"
        odd.write_bytes(b"\0" * 6)
        r = _recipe(address, 22050, 2, odd, bad, "{}")
        assert r.returncode == 2 and "whole number" in r.stderr and not bad.exists()
