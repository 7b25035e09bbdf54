"""Protection on a CUDA device (marker `gpu`: deselected by default, run with `pytest -m gpu tests/test_gpu.py`).

The embedded cloak-mini protects the same clip with the same seed on the GPU (fp32, and bf16 autocast, what `auto`
picks there) and on the CPU (fp32). Float arithmetic differs between the devices, so the perturbations are not
bit-identical; what must hold on the GPU: the output keeps the input's shape and stays within epsilon of it, and
the protection does about as much as on the CPU (the weighted objective gains as much, within a factor of two, at
a similar SNR).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE

from cloak import ProtectConfig, ProtectResult, load_models, protect, read_audio

pytestmark = pytest.mark.gpu

CONFIG = ProtectConfig(iterations=8, repeats=2, t_adv=2, source_frames=64, seed=3)
SECONDS = 2.0


def speech() -> tuple[np.ndarray, int]:
    clip = read_audio(SAMPLE)
    return clip.samples[: int(SECONDS * clip.sample_rate)], clip.sample_rate


def protect_on(device: str, precision: str) -> ProtectResult:
    x, rate = speech()
    return protect(x, rate, load_models(device=device, precision=precision), CONFIG)


def objective_gain(result: ProtectResult) -> float:
    """How much the weighted objective rose from the clean window (delta = 0) to the final perturbation."""
    start, end = result.metrics["losses_start"], result.metrics["losses_end"]
    weights = CONFIG.loss_weights
    return sum(weights[k] * (end[k] - start[k]) for k in end)


def check_like_reference(result: ProtectResult, reference: ProtectResult) -> None:
    """Within budget on every sample, and an effect comparable to the reference run's."""
    x, _ = speech()
    assert result.audio.shape == x.shape and result.audio.dtype == np.float32
    assert np.isfinite(result.audio).all()
    d = np.abs(result.audio.astype(np.float64) - x)
    assert 0 < d.max() <= CONFIG.epsilon
    gain, ref_gain = objective_gain(result), objective_gain(reference)
    assert ref_gain > 0 and 0.5 * ref_gain <= gain <= 2.0 * ref_gain, (gain, ref_gain)
    assert abs(result.metrics["snr_db"] - reference.metrics["snr_db"]) < 3.0, \
        (result.metrics["snr_db"], reference.metrics["snr_db"])


@pytest.fixture(scope="module")
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: torch.cuda.is_available() is False")
    return "cuda"


@pytest.fixture(scope="module")
def on_cpu(cuda: str) -> ProtectResult:
    """The CPU reference (fp32), computed only where there is a GPU to compare with."""
    return protect_on("cpu", "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_protection_on_cuda_stays_within_epsilon_and_works_as_on_cpu(cuda: str, on_cpu: ProtectResult,
                                                                     precision: str) -> None:
    result = protect_on(cuda, precision)
    assert result.metrics["precision"] == precision
    check_like_reference(result, on_cpu)
