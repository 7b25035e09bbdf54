"""Shared fixtures and helpers of the `cloak` command-line tests (test_cli*.py; no tests here): a clean environment,
one torch thread, a tiny model bundle, real speech (the sample shipped with the package) written in several formats,
a fake engine, and a guard that no models load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLE
from scipy.signal import resample_poly

import cloak
from clients import cli
from clients.cli import protector as cli_protector

SPEECH = SAMPLE  # LibriSpeech 3331-159605-0003, 16 kHz PCM_16 FLAC, ships with the package
EPS = 0.002
# tiny, fast settings: 2 iterations, a single draw per step; a large step so the perturbation is clearly > 0
FAST = ["--iterations", "2", "--repeats", "1", "--t-adv", "1", "--source-frames", "32", "--gender", "male",
        "--epsilon", str(EPS), "--step-size", "0.001"]
SUMMARY_KEYS = {"input", "output", "seconds", "snr_db", "linf", "losses_start", "losses_end", "iterations",
                "windows", "gender", "masking_exponents", "predicted_pesq", "models", "config"}


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CLOAK_MODELS", "CLOAK_SERVER", "CLOAK_TOKEN_FILE", "CLOAK_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user config file leaks in


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread: far faster than oversubscribed threads on a small busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", name="bundle")
def bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloak.models import DiffVC

    torch.manual_seed(0)
    m = DiffVC(channels=32, filters=64, heads=2, layers=2, enc_dim=16, spk_dim=16, dec_dim=16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".g"):
                p.fill_(0.5)
    d = tmp_path_factory.mktemp("bundle")
    torch.save({"config": m.config.to_dict(), "state_dict": m.state_dict(), "meta": {}}, d / "diffvc.pt")
    return d


@pytest.fixture(scope="module", name="speech")
def speech_fixture() -> np.ndarray:
    x, rate = sf.read(str(SPEECH), dtype="float64", start=8000, frames=32000)  # 2 s at 16 kHz
    assert rate == 16000
    return x * (0.8 / np.max(np.abs(x)))


def mono16(speech: np.ndarray, path: Path) -> Path:
    sf.write(str(path), speech.astype(np.float32), 16000, subtype="PCM_16")
    return path


def stereo44(speech: np.ndarray, path: Path) -> Path:
    x = resample_poly(speech, 441, 160)
    sf.write(str(path), np.stack([x, -0.5 * x[::-1]], axis=1).astype(np.float32), 44100, subtype="PCM_16")
    return path


def flac48(speech: np.ndarray, path: Path) -> Path:
    sf.write(str(path), resample_poly(speech, 3, 1).astype(np.float32), 48000, format="FLAC", subtype="PCM_16")
    return path


def read_2d(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="float64", always_2d=True)[0]


def json_lines(out: str) -> list[dict]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # every stdout line must be JSON


def fake_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No models: `cloak.protect` adds a fixed +-EPS pattern (the budget's very edge, where rounding to the nearest
    PCM step would break the bound). Returns the list that records every protect call."""
    from cloak import ProtectResult

    calls: list[str] = []

    def load(settings: cli.Settings) -> object:
        calls.append("load")
        return type("FakeModels", (), {"wavlm": None, "info": []})()

    def protect(audio, sample_rate, models, config, progress=None, cancel=None):  # noqa: ANN001, ANN202
        calls.append("protect")
        x = np.asarray(audio, dtype=np.float32)
        sign = np.where(np.arange(x.shape[0]) % 3 == 0, -1.0, 1.0).astype(np.float32)
        delta = config.epsilon * (sign if x.ndim == 1 else sign[:, None])
        out = np.clip(x + delta, -1, 1).astype(np.float32)
        return ProtectResult(out, sample_rate, {"seconds": 0.0, "iterations": 1})

    monkeypatch.setattr(cli_protector, "load_models_for", load)
    monkeypatch.setattr(cloak, "protect", protect)
    return calls


@pytest.fixture(name="no_models")
def no_models_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(settings: cli.Settings) -> None:
        raise AssertionError("models were loaded although nothing needed them")

    monkeypatch.setattr(cli_protector, "load_models_for", refuse)
    monkeypatch.setattr(cli_protector, "remote_protector", refuse)
