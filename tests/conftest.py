"""Shared fixtures: real corpus speech and a small DiffVC with the official layout at tiny widths.

Test data beyond what ships in the package lives in the project's `shared/` folder, found next to the
repository root (`<repo>/../shared`) or at $VOICECLOAK_SHARED. Tests that need it skip, naming the missing
path, when it is absent; with the environment variable CI set (CI has the data) they fail instead, so a CI
run cannot pass by skipping them. Speech that ships with the package (cloak/data/samples, cloak/data/voicebank)
needs nothing of the kind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VOICECLOAK_SHARED") or REPO.parent / "shared").expanduser()
CORPUS = SHARED / "corpus"
REFERENCE = SHARED / "reference"
SAMPLE = REPO / "cloak" / "data" / "samples" / "librispeech-3331-159605-0003.flac"  # ships with the package
TINY = dict(channels=32, filters=64, heads=2, layers=2, enc_dim=16, spk_dim=16, dec_dim=16)


def need_data(path: Path, what: str = "test data") -> Path:
    """``path`` if it exists; else skip the test saying what is missing and where it was looked for, or fail
    when $CI is set (CI has the shared data: a missing file there is a broken set-up, not a reason to skip)."""
    if path.exists():
        return path
    msg = (f"{what} not found at {path} (the project's shared/ folder beside the repository, "
           f"or set VOICECLOAK_SHARED=DIR)")
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {msg}", pytrace=False)
    pytest.skip(msg)


def corpus_file(speaker: str = "vctk_p226", index: int = 0) -> Path:
    files = sorted(need_data(CORPUS / speaker, f"corpus speaker {speaker}").iterdir())
    return files[index]


def corpus_clip(speaker: str = "vctk_p226", index: int = 0, seconds: float | None = None) -> tuple[np.ndarray, int]:
    x, sr = sf.read(str(corpus_file(speaker, index)), dtype="float32")
    if seconds is not None:
        x = x[: int(seconds * sr)]
    return x, sr


def to_rate(x: np.ndarray, sr: int, new_sr: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = np.gcd(sr, new_sr)
    return resample_poly(x, new_sr // g, sr // g).astype(np.float32)


def tiny_diffvc(seed: int = 0, gate: float = 0.5, tame: bool = False):
    """tame=True: small gates and score, so that an untrained sampler does not diverge (for cloning tests)."""
    from cloak.models import DiffVC

    torch.manual_seed(seed)
    m = DiffVC(**TINY)
    with torch.no_grad():  # a fresh DiffVC has all Rezero gates at 0: open them so attention matters
        for name, p in m.named_parameters():
            if name.endswith(".g"):
                p.fill_(0.01 if tame else gate)
        if tame:
            m.decoder.estimator.final_conv.weight.mul_(1e-3)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def corpus() -> Path:
    return need_data(CORPUS, "the shared speech corpus")


@pytest.fixture(scope="session")
def tiny_models(corpus):
    from cloak.bank import VoiceBank
    from cloak.bundle import Models
    from cloak.models import GE2E

    return Models(diffvc=tiny_diffvc(), ge2e=GE2E.load(), bank=VoiceBank(), device=torch.device("cpu"))


def make_bundle(d: Path, tame: bool = False, seed: int = 0) -> Path:
    m = tiny_diffvc(seed=seed, tame=tame)
    d.mkdir()
    torch.save({"config": m.config.to_dict(), "state_dict": m.state_dict(), "meta": {}}, d / "diffvc.pt")
    return d


@pytest.fixture()
def tiny_bundle(tmp_path):
    """A model bundle directory holding a tiny cloak-format DiffVC checkpoint."""
    return make_bundle(tmp_path / "bundle")
