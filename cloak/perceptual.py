"""Perceptual shaping of the perturbation: keep delta under the clean speech's masking threshold.

Why: the paper's only constraint is the absolute box |delta| <= epsilon (0.002 of full scale). Sign-gradient
PGD fills that box with dense, white-ish noise, so its audibility depends on the recording: on a quiet take
(-26 dBFS active speech level) the same box is ~10 dB louder relative to the voice than on a loud one, and
the noise is as loud in the pauses, above 8 kHz and between harmonics (where speech leaves nothing to hide
it) as under the vowels. Measured at the paper's settings: PESQ-WB 2.15, SNR 24.9 dB on a female reader at
-26 dBFS.

What this module adds (pure functions on tensors/arrays, used by the engine's projection step):

* `active_speech_level`: ITU-T P.56 method B active speech level (dB re full scale, 0 dB = RMS 1.0), used
  to scale test clips to a stated level and to report it.
* `masking_threshold`: per-STFT-bin magnitude bound M(f, t) for delta. The clean power spectrum is spread
  over frequency with a Schroeder-style simultaneous-masking kernel on the Bark scale (+25 dB/Bark below a
  masker, -10 dB/Bark above it, normalised so that spreading moves energy without adding any) and held over
  time with a short forward-masking decay (`decay_ms`); this is bent towards a flat, level-relative bound by
  `exponent` (gamma: bound power = spread^gamma * flat^(1 - gamma), flat = white noise at the clip's active
  speech level), then lowered by `margin_db`. Either way the bound is relative to the recording (scaling the
  input by g scales M by g), zero where the clean signal is digital silence, small in pauses and in bands
  where the voice has little energy. Why relative and not a psychoacoustic model's absolute threshold in
  quiet: the playback level of a file is unknown, and a relative bound keeps its promise at any level. Why
  gamma < 1: noise exactly under the masking threshold is the least audible but also barely moves the log-mel
  features a cloner reads (measured: half the GE2E effect of gamma 0.5 at the same PESQ goal). Which gamma: by
  default each window's, chosen for a predicted PESQ-WB (cloak.quality.window_exponent).
* `shaped_step`: the engine's PGD step under that bound, the time-frequency analogue of the sign step (each
  bin moves by a fixed fraction of its bound along the gradient's phase), followed by the projection.
* `project_spectral`: the projection delta <- ISTFT(STFT(delta) * min(1, M / |STFT(delta)|)), i.e. each
  bin's magnitude is clipped to M with its phase kept: the Euclidean projection onto {|STFT(delta)| <= M}
  in the STFT domain, mapped back by the least-squares ISTFT (an alternating projection: the frames overlap,
  so a little energy leaks over the bound, less after every step). The engine applies the epsilon box right
  after, so the l-infinity promise |delta| <= epsilon is untouched.

With `ProtectConfig.shaping = "masking"` the engine (`cloak.protect.pgd_step`) replaces its sign step by
`shaped_step` with the window's `masking_threshold`; with `shaping = "none"` none of this runs and the engine
is the paper's plain l-infinity PGD.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

# STFT of the shaping at DiffVC's 22.05 kHz: 1024-point Hann frames (46 ms, 21.5 Hz bins: harmonics of a
# low voice are resolved, so delta can sit under them and not between them), hop 256 (75 % overlap: the
# ISTFT of a clipped spectrum stays close to it).
SHAPING_N_FFT = 1024
SHAPING_HOP = 256
# Bark-domain spreading slopes (dB per Bark) of a masker towards lower and higher frequencies (Schroeder 1979,
# as used by psychoacoustic audio coders and adversarial examples, e.g. Qin et al. 2019).
SPREAD_LOWER_DB_PER_BARK = 25.0
SPREAD_UPPER_DB_PER_BARK = 10.0

# The masking shaping's promise on the whole perturbation: its power stays this far under the clean window's (an SNR
# floor, enforced by `under_snr_floor` after every step). The bound's margin sets the SNR only approximately (33.3-35.5
# dB at -26 dBFS on the corpus speakers, 32.7 dB on one quiet native-level take): the floor makes the product's
# quality goal (SNR >= 33 dB after resampling to the input's rate, cross-fading and integer rounding) a guarantee,
# with 1 dB to spare for those steps.
SNR_FLOOR_DB = 34.0

# P.56 method B constants
P56_TIME_CONSTANT_S = 0.03
P56_HANGOVER_S = 0.2
P56_MARGIN_DB = 15.9


# ------------------------------------------------------------------------------------ active speech level
def active_speech_level(x: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """(active speech level in dB re full scale (RMS 1.0 = 0 dB), activity factor in [0, 1]) of a mono
    signal, after ITU-T P.56 method B: the rectified signal is smoothed twice with a 30 ms time constant,
    every sample within a 200 ms hangover of an envelope above threshold c counts as active, and the level
    is the one whose threshold sits 15.9 dB below it (interpolated between the 2^-k thresholds). A signal
    without activity gives (-inf, 0)."""
    from scipy.signal import lfilter

    x = np.asarray(x, np.float64).ravel()
    n = x.size
    energy = float(np.sum(x * x))
    if n == 0 or energy <= 0.0:
        return -math.inf, 0.0
    g = math.exp(-1.0 / (sample_rate * P56_TIME_CONSTANT_S))
    env = lfilter([1.0 - g], [1.0, -g], lfilter([1.0 - g], [1.0, -g], np.abs(x)))
    hang = max(1, int(math.ceil(P56_HANGOVER_S * sample_rate)))
    thresholds = 2.0 ** np.arange(-20, 1)  # -120 .. 0 dB
    levels, gaps = [], []
    for c in thresholds:
        above = (env >= c).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(above)])
        lo = np.maximum(np.arange(1, n + 1) - hang, 0)
        active = int(np.count_nonzero(csum[1:] - csum[lo]))  # an envelope >= c within the last `hang` samples
        if active == 0:
            levels.append(-math.inf)
            gaps.append(-math.inf)
            continue
        a = 10 * math.log10(energy / active)
        levels.append(a)
        gaps.append(a - 20 * math.log10(c))
    # the gap (level - threshold) falls as the threshold rises; find where it crosses the margin
    for j in range(1, len(thresholds)):
        if gaps[j] <= P56_MARGIN_DB and math.isfinite(gaps[j - 1]) and gaps[j - 1] > P56_MARGIN_DB:
            if not math.isfinite(gaps[j]):
                break
            w = (gaps[j - 1] - P56_MARGIN_DB) / (gaps[j - 1] - gaps[j])
            level = (1 - w) * levels[j - 1] + w * levels[j]
            return float(level), float(min(1.0, energy / n / 10 ** (level / 10)))
    # no crossing (e.g. a pure tone or near-silence): fall back to the plain RMS over the whole clip
    level = 10 * math.log10(energy / n)
    return float(level), 1.0


def scale_to_level(x: np.ndarray, sample_rate: int, level_db: float) -> np.ndarray:
    """`x` (mono or (frames, channels)) scaled so that its mono mix has the P.56 active level `level_db`."""
    x = np.asarray(x, np.float32)
    mono = x if x.ndim == 1 else x.mean(axis=1)
    current, _ = active_speech_level(mono, sample_rate)
    if not math.isfinite(current):
        raise ValueError("the clip has no active speech to scale")
    return (x * np.float32(10 ** ((level_db - current) / 20))).astype(np.float32)


# ------------------------------------------------------------------------------------- masking threshold
def _bark(f: np.ndarray) -> np.ndarray:
    """Zwicker & Terhardt's critical-band rate (Bark) of frequencies in Hz."""
    return 13.0 * np.arctan(0.00076 * f) + 3.5 * np.arctan((f / 7500.0) ** 2)


@lru_cache(maxsize=8)
def spreading_matrix(sample_rate: int, n_fft: int = SHAPING_N_FFT) -> np.ndarray:
    """(F, F) simultaneous-masking spread: row i = how much of each masker bin's power lands on bin i.
    Columns sum to one, so spreading redistributes a frame's power without adding to it."""
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    z = _bark(f)
    dz = z[:, None] - z[None, :]  # target minus masker (Bark)
    db = np.where(dz >= 0, -SPREAD_UPPER_DB_PER_BARK * dz, SPREAD_LOWER_DB_PER_BARK * dz)
    s = 10.0 ** (db / 10.0)
    return (s / s.sum(axis=0, keepdims=True)).astype(np.float32)


def _window(n_fft: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(n_fft, device=device, dtype=torch.float32)


def stft(x: torch.Tensor, n_fft: int = SHAPING_N_FFT, hop: int = SHAPING_HOP) -> torch.Tensor:
    """Complex STFT (..., F, T) of (..., N) float32 audio, Hann window, centred."""
    return torch.stft(x, n_fft, hop, window=_window(n_fft, x.device), center=True, return_complex=True)


def istft(spec: torch.Tensor, length: int, n_fft: int = SHAPING_N_FFT, hop: int = SHAPING_HOP) -> torch.Tensor:
    return torch.istft(spec, n_fft, hop, window=_window(n_fft, spec.device), center=True, length=length)


def masking_threshold(x: torch.Tensor, sample_rate: int, margin_db: float, decay_ms: float = 20.0,
                      exponent: float = 1.0, n_fft: int = SHAPING_N_FFT,
                      hop: int = SHAPING_HOP) -> torch.Tensor:
    """Per-bin magnitude bound (F, T) for the STFT of delta, from clean audio `x` (N,) at `sample_rate`:
    the clean power spread over frequency (Bark kernel, `spreading_matrix`) and held over time with a
    forward-masking decay (e-fold every `decay_ms`), then lowered by `margin_db`.

    `exponent` (gamma in [0, 1]) bends the bound between two shapes, both relative to the clip's level:
    bound power = spread^gamma * flat^(1 - gamma) * 10^(-margin/10), where `flat` is the per-bin power of
    white noise at the clip's active speech level (P.56). gamma = 1: the masking threshold itself (the cloak
    hides under the voice, pauses clean); gamma = 0: a flat bound `margin_db` under the active level
    everywhere (the paper's dense box made level-relative); in between, weak cells get relatively more room
    and strong ones less (power compressed like loudness)."""
    if x.ndim != 1:
        raise ValueError(f"masking_threshold expects mono (N,) audio, got shape {tuple(x.shape)}")
    with torch.no_grad():
        power = stft(x.float(), n_fft, hop).abs().square()  # (F, T)
        spread = torch.from_numpy(spreading_matrix(sample_rate, n_fft)).to(power.device) @ power
        if decay_ms > 0:
            a = math.exp(-hop / sample_rate / (decay_ms / 1000.0))
            held = spread.clone()
            for t in range(1, held.shape[-1]):  # forward masking: a loud frame masks the next few
                held[:, t] = torch.maximum(held[:, t], held[:, t - 1] * a)
            spread = held
        if exponent < 1.0:
            level, _ = active_speech_level(x.detach().cpu().numpy(), sample_rate)
            if not math.isfinite(level):
                return torch.zeros_like(spread)
            # per-bin power of white noise at the active speech level under the Hann window
            flat = 10.0 ** (level / 10.0) * float(_window(n_fft, x.device).square().sum())
            spread = spread.pow(exponent) * flat ** (1.0 - exponent)
        return (spread * 10.0 ** (-margin_db / 10.0)).sqrt()


def project_spectral(delta: torch.Tensor, bound: torch.Tensor, n_fft: int = SHAPING_N_FFT,
                     hop: int = SHAPING_HOP) -> torch.Tensor:
    """Clip every STFT bin of `delta` ((N,) or (B, N)) to magnitude `bound` ((F, T) or (B, F, T)), phase
    kept, and return to the waveform by the ISTFT (length N)."""
    spec = stft(delta, n_fft, hop)
    mag = spec.abs()
    scale = torch.where(mag > bound, bound / mag.clamp_min(1e-30), torch.ones_like(mag))
    return istft(spec * scale, delta.shape[-1], n_fft, hop)


def shaped_step(delta: torch.Tensor, grad: torch.Tensor, bound: torch.Tensor, rel_step: float,
                n_fft: int = SHAPING_N_FFT, hop: int = SHAPING_HOP) -> torch.Tensor:
    """One ascent step of `delta` along `grad` ((N,) or (B, N)) within the per-bin bound, then the projection.

    The sign step of l-infinity PGD is the steepest ascent for a box: every sample moves by the same alpha.
    Its time-frequency analogue for the bound |STFT(delta)| <= M moves every bin by rel_step * M along the
    phase of the gradient's STFT (the STFT of a gradient is the gradient with respect to the STFT bins, up to
    the frame's constant, because a Hann STFT at 75 % overlap is a tight frame). So, like the paper's step
    epsilon/50, rel_step = step_size / epsilon = 1/50 crosses the bound in 50 iterations, and every bin fills
    its own share of the masking budget: a white sign step, projected, would waste most of its energy in the
    weak bins (clipped away) and take hundreds of steps to fill the strong ones."""
    spec_g = stft(grad, n_fft, hop)
    mag_g = spec_g.abs()
    direction = torch.where(mag_g > 0, spec_g / mag_g.clamp_min(1e-30), torch.zeros_like(spec_g))
    spec = stft(delta, n_fft, hop) + rel_step * bound * direction
    mag = spec.abs()
    scale = torch.where(mag > bound, bound / mag.clamp_min(1e-30), torch.ones_like(mag))
    return istft(spec * scale, delta.shape[-1], n_fft, hop)


def snr_floor_power(x: torch.Tensor, floor_db: float = SNR_FLOOR_DB) -> torch.Tensor:
    """The most power (sum of squares, a float64 scalar on x's device) a perturbation of `x` may have: `floor_db`
    under x's own."""
    return x.double().square().sum() * 10.0 ** (-floor_db / 10.0)


def under_snr_floor(delta: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`delta` scaled down, where needed, so that its power is at most `allowed` (`snr_floor_power`); unchanged
    (scale exactly 1) where it already is. A uniform scale keeps delta's shape (under the masking bound and the
    epsilon box, which it only tightens) and moves x + delta toward x, so full scale still holds. Stays on the
    device: no host synchronisation in the PGD step."""
    power = delta.double().square().sum()
    scale = torch.sqrt(allowed / power.clamp_min(1e-300)).clamp(max=1.0)
    return delta * scale.to(delta.dtype)


def excess_fraction(delta: torch.Tensor, bound: torch.Tensor, n_fft: int = SHAPING_N_FFT,
                    hop: int = SHAPING_HOP) -> float:
    """Share of delta's STFT energy that lies above the bound (0: under the threshold everywhere). The
    ISTFT of a clipped spectrum is not exactly clipped (its frames overlap), so one projection leaves a small
    excess, concentrated in the weak bins next to strong ones; repeated projections (one per PGD step)
    shrink it further. A diagnostic for tests and reports."""
    mag = stft(delta, n_fft, hop).abs()
    total = float(mag.square().sum())
    return float((mag - bound).clamp_min(0).square().sum()) / total if total > 0 else 0.0


__all__ = ["active_speech_level", "scale_to_level", "spreading_matrix", "masking_threshold", "project_spectral",
           "shaped_step", "snr_floor_power", "under_snr_floor", "excess_fraction", "SNR_FLOOR_DB", "stft", "istft",
           "SHAPING_N_FFT", "SHAPING_HOP"]
