"""The `cloak` command line (clients.cli) beyond protect: models, info, help, the module entry point, the shipped
sample. `cloak protect` is tested in test_cli_protect.py, test_cli_formats.py and test_cli_fail_fast.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_helpers import (  # noqa: F401 - fixtures are found by name (autouse ones, and arguments)
    EPS,
    FAST,
    bundle_fixture,
    clean_env,
    one_torch_thread,
    read_2d,
)

import cloak
from clients import cli
from clients.cli import main

# ------------------------------------------------------------------------------------------- models, info


def test_models_list_and_verify(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models", str(bundle), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    dv = next(m for m in report["models"] if m["name"] == "diffvc")
    assert dv["path"] == str(bundle / "diffvc.pt")
    assert dv["sha256"] == hashlib.sha256((bundle / "diffvc.pt").read_bytes()).hexdigest()
    assert (dv["device"], dv["dtype"]) == ("cpu", "float32")
    assert any(m["name"] == "ge2e" and len(m["sha256"]) == 64 for m in report["models"])

    # a copy with SHA256SUMS: verify loads everything; a wrong digest or a missing file -> exit 4
    b2 = tmp_path / "bundle"
    b2.mkdir()
    (b2 / "diffvc.pt").write_bytes((bundle / "diffvc.pt").read_bytes())
    (b2 / "SHA256SUMS").write_text(f"{dv['sha256']}  diffvc.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "all models load" in out
    (b2 / "SHA256SUMS").write_text(f"{'0' * 64}  diffvc.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--device", "cpu"]) == 4
    assert "sha256 mismatch" in capsys.readouterr().err
    (b2 / "SHA256SUMS").write_text(f"{dv['sha256']}  diffvc.pt\n{'1' * 64}  ge2e.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--json", "--device", "cpu"]) == 4
    cap = capsys.readouterr()
    assert "missing" in cap.err and json.loads(cap.out)["ok"] is False
    assert main(["models", "--models", str(tmp_path / "nowhere")]) == 4


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["voicecloak"] == cloak.__version__
    assert {"torch", "numpy", "soundfile", "python"} <= info["versions"].keys()
    assert isinstance(info["devices"]["cuda"], bool)
    assert info["config_file"] is None and info["default_config_file"].endswith("voicecloak/config.toml")
    assert main(["info"]) == 0
    assert "versions:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["protect"], ["models"], ["info"]])
def test_help_teaches_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit codes:" in out and "130" in out


def test_no_command_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["fly"]) == 2
    capsys.readouterr()


def test_clone_registered_only_if_available(capsys: pytest.CaptureFixture[str]) -> None:
    available = importlib.util.find_spec("cloak.clone") is not None
    assert main(["clone", "--help"]) == (0 if available else 2)
    capsys.readouterr()


def test_module_entry_point_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[2])}  # clients/cli/__init__.py
    r = subprocess.run([sys.executable, "-m", "clients.cli", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "protect" in r.stdout and "exit codes:" in r.stdout


# ------------------------------------------------------------------------------------------ shipped sample


def test_shipped_sample_protect_and_copy(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cloak.sample import sample_path

    src = sample_path()
    info = sf.info(str(src))
    assert src.stat().st_size <= 1_000_000 and 4 <= info.duration <= 6 and (src.parent / "SOURCES.md").is_file()
    assert "CC BY 4.0" in (src.parent / "SOURCES.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["protect", "--sample", "--models", str(bundle), *FAST]) == 0  # written here, not in the package
    out = tmp_path / cli.SAMPLE_OUTPUT
    assert (sf.info(str(out)).format, sf.info(str(out)).subtype, sf.info(str(out)).frames) == (
        "FLAC", "PCM_16", info.frames)
    assert 0 < np.max(np.abs(read_2d(out) - read_2d(src))) <= EPS
    assert main(["protect", "--sample", str(out)]) == 2  # --sample takes no other inputs
    assert main(["protect"]) == 2
    assert "--sample" in capsys.readouterr().err
    assert main(["sample", "mine.flac"]) == 0 and (tmp_path / "mine.flac").read_bytes() == src.read_bytes()
    assert "CC BY 4.0" in capsys.readouterr().out
    assert main(["sample", "mine.flac"]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["sample", "--path"]) == 0 and capsys.readouterr().out.strip() == str(src)
