"""Predicted audibility of a shaping bound, and the per-window choice of its exponent.

Why: the masking bound's exponent gamma (cloak.perceptual.masking_threshold) trades effect for quality, and the
trade differs from recording to recording. A flat bound (gamma 0) doubles the black-box verifier's effect on the
tuning speakers (bench/results/operating_points.md) but drops PESQ-WB under 3.5 on recordings with little
masking headroom (quiet studio pauses, narrow spectra), while others keep PESQ-WB above 4.3 even at gamma 0.25
(bench/results/audibility-shape.md). A fixed exponent has to be set for the worst recording. Here each window
gets the flattest exponent whose perturbation is *predicted* to stay above a PESQ-WB target.

How, without running PESQ (its reference code is C, not installable everywhere the product runs):

* `probe_delta`: the perturbation PGD ends with fills its bound (every STFT bin near its magnitude limit, the
  phase set by the gradient). The probe is that, with random phases: the bound (2 dB over it, where measured PGD
  perturbations sit after the projections' leakage), the epsilon box and the SNR floor, as in the engine.
  Measured on the 14 corpus speakers (3 settings, 58 clips): PESQ-WB of the probe is that of the real cloak
  0.0-0.25 higher without the 2 dB, about equal with it.
* `disturbance`: a PESQ-like distance of clean vs clean + probe, with P.862's mechanics in small: 32 ms frames
  at 16 kHz, half-Bark bands, Zwicker loudness (exponent 0.23) over the threshold in quiet with the clip's active
  speech level placed at 79 dB SPL (P.862's listening level), the symmetric disturbance with its dead zone
  (a quarter of the smaller loudness), L6 over 20-frame intervals and L2 over the clip.
* `predicted_pesq`: PESQ-WB from the disturbance by a logistic curve fitted on corpus-train clips
  (bench/quality_model.py: no speaker of `shared/corpus` in the fit; results in bench/results/quality_model.json,
  with the cross-validated error).
* `window_exponent`: the flattest gamma in [0, 1] (bisection, 1/32) whose prediction meets the target; 1 if none.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .features import resample
from .perceptual import active_speech_level, istft, masking_threshold, snr_floor_power, under_snr_floor

# bisection steps of the exponent (gamma of cloak.perceptual.masking_threshold) in [0, 1]: a resolution of 1/32
EXPONENT_STEPS = 5
# where PGD's perturbation sits relative to its bound (dB): the projection's overlap leaks a little over it
PROBE_OVER_BOUND_DB = 2.0
PROBE_SEED = 0  # the probe's phases: fixed, so a window's choice does not depend on the job's random state

RATE = 16_000
N_FFT = 512
HOP = 256
LISTENING_LEVEL_DB_SPL = 79.0  # P.862's assumed listening level of the active speech
DEAD_ZONE = 0.25  # P.862: loudness differences under a quarter of the smaller loudness are inaudible
LOUDNESS_EXPONENT = 0.23  # Zwicker
INTERVAL_FRAMES = 20  # P.862's split-second interval (20 frames of 32 ms at 50 % overlap: 320 ms)

# predicted PESQ-WB = 1 + 3.64 / (1 + exp(SLOPE * (ln disturbance - CENTRE))); fitted by bench/quality_model.py
# on corpus-train (see bench/results/quality_model.json)
FIT_SLOPE = 1.2368
FIT_CENTRE = 4.0475


def _bark(f: np.ndarray) -> np.ndarray:
    return 13.0 * np.arctan(0.00076 * f) + 3.5 * np.arctan((f / 7500.0) ** 2)


def _threshold_in_quiet_db(f: np.ndarray) -> np.ndarray:
    """Terhardt's absolute threshold of hearing (dB SPL) at frequencies f (Hz)."""
    k = np.maximum(f, 20.0) / 1000.0
    return 3.64 * k ** -0.8 - 6.5 * np.exp(-0.6 * (k - 3.3) ** 2) + 1e-3 * k ** 4


@lru_cache(maxsize=1)
def _bands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(band summing matrix (B, F), threshold in quiet per band (B, 1) in dB SPL, band widths in bins (B, 1))."""
    f = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    band = np.digitize(_bark(f), np.arange(0.0, _bark(f)[-1] + 0.5, 0.5)) - 1
    n = int(band.max()) + 1
    g = np.zeros((n, f.size), np.float64)
    g[band, np.arange(f.size)] = 1.0
    centre = np.array([f[band == b].mean() for b in range(n)])
    width = np.bincount(band, minlength=n).astype(np.float64)
    return (torch.from_numpy(g), torch.from_numpy(_threshold_in_quiet_db(centre))[:, None],
            torch.from_numpy(width)[:, None])


def _band_db(x: torch.Tensor, offset_db: float) -> torch.Tensor:
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    power = torch.stft(x.double(), N_FFT, HOP, window=window, return_complex=True).abs().square()
    g, _, _ = _bands()
    return 10.0 * torch.log10(g @ power / window.square().sum() + 1e-30) + offset_db


def _loudness(band_db: torch.Tensor, threshold_db: torch.Tensor) -> torch.Tensor:
    excess = 10.0 ** ((band_db - threshold_db) / 10.0)
    return ((0.5 + 0.5 * excess) ** LOUDNESS_EXPONENT - 1.0).clamp_min(0.0) * 2.0 ** LOUDNESS_EXPONENT


def disturbance(clean: torch.Tensor, delta: torch.Tensor, sample_rate: int) -> float:
    """PESQ-like disturbance (>= 0; 0 = inaudible) of mono `clean` + `delta` ((N,) each) against `clean`."""
    c16 = resample(clean.detach().float().cpu(), sample_rate, RATE)
    d16 = resample(delta.detach().float().cpu(), sample_rate, RATE)
    level, _ = active_speech_level(c16.numpy(), RATE)
    if not math.isfinite(level):
        return 0.0
    offset = LISTENING_LEVEL_DB_SPL - level
    _, threshold, width = _bands()
    ref = _loudness(_band_db(c16, offset), threshold)
    deg = _loudness(_band_db(c16 + d16, offset), threshold)
    d = ((deg - ref).abs() - DEAD_ZONE * torch.minimum(ref, deg)).clamp_min(0.0)
    frame = ((d.square() * width).sum(0) / width.sum()).sqrt() / (ref.sum(0) + 5.0) ** 0.04 * 10.0
    starts = range(0, max(1, frame.numel() - INTERVAL_FRAMES + 1), INTERVAL_FRAMES // 2)
    l6 = torch.stack([frame[s:s + INTERVAL_FRAMES].pow(6).mean().pow(1 / 6) for s in starts])
    return float(l6.square().mean().sqrt())


def predicted_pesq(dist: float) -> float:
    """PESQ-WB (P.862.2, 1.04-4.64) predicted from `disturbance`."""
    if dist <= 0.0:
        return 4.64
    return 1.0 + 3.64 / (1.0 + math.exp(FIT_SLOPE * (math.log(dist) - FIT_CENTRE)))


def probe_delta(x: torch.Tensor, bound: torch.Tensor, epsilon: float) -> torch.Tensor:
    """A perturbation that fills `bound` (F, T) of mono window `x` (N,) as PGD's does (random phases, fixed seed),
    within the epsilon box and the SNR floor."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    phase = (torch.rand(bound.shape, generator=gen) * (2 * math.pi)).to(bound.device)
    d = istft(torch.polar(bound * 10.0 ** (PROBE_OVER_BOUND_DB / 20.0), phase), x.shape[-1])
    d = d.clamp(-epsilon, epsilon)
    return under_snr_floor(d, snr_floor_power(x))


def _prediction(x: torch.Tensor, sample_rate: int, margin_db: float, epsilon: float,
                gamma: float) -> tuple[float, torch.Tensor]:
    bound = masking_threshold(x, sample_rate, margin_db, exponent=gamma)
    return predicted_pesq(disturbance(x, probe_delta(x, bound, epsilon), sample_rate)), bound


def window_exponent(x: torch.Tensor, sample_rate: int, margin_db: float, epsilon: float,
                    target: float) -> tuple[float, float, torch.Tensor]:
    """(gamma, predicted PESQ-WB, bound): the flattest exponent in [0, 1], to `EXPONENT_STEPS` halvings, whose
    probe perturbation of mono window `x` (N,) is predicted at PESQ-WB >= `target`, with its masking bound (F, T);
    gamma 1 (the masking threshold itself, the quietest) if even that is not. Bisection: the prediction falls as
    the bound flattens; where it does not quite, the answer still meets the target, only perhaps not the flattest
    that does."""
    pred, bound = _prediction(x, sample_rate, margin_db, epsilon, 0.0)
    if pred >= target:
        return 0.0, pred, bound
    lo, hi = 0.0, 1.0
    best = _prediction(x, sample_rate, margin_db, epsilon, hi)
    if best[0] < target:
        return hi, *best
    for _ in range(EXPONENT_STEPS):
        mid = (lo + hi) / 2
        trial = _prediction(x, sample_rate, margin_db, epsilon, mid)
        if trial[0] >= target:
            hi, best = mid, trial
        else:
            lo = mid
    return hi, *best


__all__ = ["EXPONENT_STEPS", "disturbance", "predicted_pesq", "probe_delta", "window_exponent"]
