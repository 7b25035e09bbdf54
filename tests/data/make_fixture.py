"""The stored bit-identity fixture of the protection engine: what `cloak.protect` returns for fixed small inputs,
models and seeds (tests/test_fixture_identity.py compares a fresh run with it, np.array_equal).

Regenerate it only when the engine's output is meant to change (and ENGINE_VERSION in cloak/protect.py changes
with it); a refactor must leave it as it is:

    python tests/data/make_fixture.py            # writes tests/data/engine_fixture.npz

Both cases run on the CPU, one thread, fp32, from data that ships with the repository: the LibriSpeech sample in
cloak/data/samples and
  tiny  the tests' tiny DiffVC (tests/conftest.py `tiny_diffvc`, built from torch seed 0; no speaker-adaptive
        prior), GE2E and the shipped voice bank: mono, 2 s in 1 s windows (three, cross-faded), masking shaping,
        a fixed gender;
  mini  the embedded cloak-mini (speaker-adaptive prior, so L_voice runs): stereo, 1 s, the paper's sign step
        (shaping "none"), a random start, the gender classified from the clip.
The stored file also holds, per case, a checksum of the input samples and of the model's weights, so that a
mismatch says whether the engine, the input or the model (e.g. another torch's initialisation) changed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "engine_fixture.npz"
if str(TESTS) not in sys.path:  # run as a script: conftest (tiny_diffvc, SAMPLE) is a module of tests/
    sys.path.insert(0, str(TESTS))

from conftest import SAMPLE, tiny_diffvc  # noqa: E402

from cloak import Models, ProtectConfig, load_models, protect, read_audio  # noqa: E402
from cloak.protect import ENGINE_VERSION  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    models: Callable[[], Models]
    seconds: float
    stereo: bool
    config: ProtectConfig


def tiny_models() -> Models:
    from cloak.bank import VoiceBank
    from cloak.models import GE2E

    return Models(diffvc=tiny_diffvc(), ge2e=GE2E.load(), bank=VoiceBank(), device=torch.device("cpu"))


def mini_models() -> Models:
    return load_models(None, "cpu", precision="fp32")  # fp32: `auto` would pick bf16 on CPUs that have it


CASES = (
    Case("tiny", tiny_models, 2.0, False,
         ProtectConfig(iterations=2, repeats=2, t_adv=2, source_frames=32, gender="male", window_seconds=1.0,
                       overlap_seconds=0.25, epsilon=0.004, step_size=1e-3, seed=5)),
    Case("mini", mini_models, 1.0, True,
         ProtectConfig(iterations=2, repeats=2, t_adv=2, source_frames=32, shaping="none", random_start=True,
                       epsilon=0.002, step_size=5e-4, seed=9)),
)


def case_input(case: Case) -> tuple[np.ndarray, int]:
    clip = read_audio(SAMPLE)
    x = clip.samples[: int(case.seconds * clip.sample_rate)]
    if case.stereo:
        x = np.stack([x, np.float32(0.5) * x], axis=1)
    return np.ascontiguousarray(x, dtype=np.float32), clip.sample_rate


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def weights_sha256(models: Models) -> str:
    h = hashlib.sha256()
    for name, value in sorted(models.diffvc.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One torch thread (a fixed reduction order) and no CLOAK_MODELS override of the embedded model."""
    threads = torch.get_num_threads()
    saved = os.environ.pop("CLOAK_MODELS", None)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            os.environ["CLOAK_MODELS"] = saved


def run_case(case: Case) -> dict[str, np.ndarray]:
    """The case's protected audio and the checksums of what produced it, as the fixture stores them."""
    with deterministic_cpu():
        models = case.models()
        x, rate = case_input(case)
        out = protect(x, rate, models, case.config).audio
    return {f"{case.name}/audio": out, f"{case.name}/input_sha256": np.array(sha256(x)),
            f"{case.name}/weights_sha256": np.array(weights_sha256(models))}


def main() -> None:
    stored: dict[str, np.ndarray] = {"engine_version": np.array(ENGINE_VERSION), "torch": np.array(torch.__version__)}
    for case in CASES:
        stored.update(run_case(case))
    np.savez_compressed(FIXTURE, **stored)
    print(f"wrote {FIXTURE} (ENGINE_VERSION {ENGINE_VERSION!r}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
