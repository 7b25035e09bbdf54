"""Augmentation of dB mel-power crops for speaker-verifier training (cloak.train.verifier's batches): a simulated
room (late reverberation), a noise floor, a low-pass, and frequency / time masks, drawn by `augment`."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class AugmentSettings(Protocol):
    """How often each augmentation is applied (cloak.train.verifier.VerifierSettings has these)."""

    p_room: float
    p_noise: float
    p_lowpass: float
    p_freq_mask: float
    p_time_mask: float


def _db_to_power(db: torch.Tensor) -> torch.Tensor:
    return torch.pow(10.0, db / 10.0)


def room(db: torch.Tensor, rt60_s: float, drr_db: float, hop_s: float, hf_decay: float = 2.0,
         max_s: float = 1.0) -> torch.Tensor:
    """(F, T) dB mel power (frames `hop_s` apart) through late reverberation: per bin, power convolved causally with
    an exponential decay of the bin's RT60 (the top bin decays hf_decay x faster), the tail `drr_db` below the
    direct sound."""
    n_bins, n_frames = db.shape
    k = max(2, int(max_s / hop_s))
    t = torch.arange(1, k + 1, dtype=torch.float32) * hop_s
    rt = rt60_s / torch.linspace(1.0, hf_decay, n_bins)
    decay = torch.exp(-13.8 * t[None, :] / rt[:, None])
    decay = decay / decay.sum(-1, keepdim=True) * 10 ** (-drr_db / 10)
    power = _db_to_power(db)
    padded = F.pad(power[None], (k, 0))
    tail = F.conv1d(padded, decay.flip(-1)[:, None, :], groups=n_bins)[0, :, :n_frames]
    return 10.0 * torch.log10(power + tail)


def noise_floor(db: torch.Tensor, snr_db: float, tilt_db: float) -> torch.Tensor:
    """(F, T) dB mel power plus stationary noise `snr_db` below the crop's mean power, tilted by `tilt_db` from
    the lowest to the highest bin."""
    power = _db_to_power(db)
    n_bins = db.shape[0]
    shape = 10 ** (torch.linspace(0.0, tilt_db, n_bins) / 10)
    noise = shape / shape.mean() * power.mean() * 10 ** (-snr_db / 10)
    return 10.0 * torch.log10(power + noise[:, None])


def lowpass(db: torch.Tensor, cutoff_bin: int, floor_db: float = 60.0) -> torch.Tensor:
    """Bins from `cutoff_bin` up pushed `floor_db` below the crop's peak (what a band-limited codec leaves)."""
    out = db.clone()
    out[cutoff_bin:] = torch.minimum(out[cutoff_bin:], db.max() - floor_db)
    return out


def augment(db: torch.Tensor, st: AugmentSettings, g: torch.Generator, cutoff_bins: tuple[int, int],
            hop_s: float) -> torch.Tensor:
    """One (T, F) dB crop (frames `hop_s` apart), augmented with draws from `g` (always the same number of draws:
    reproducible); a low-pass cuts off at a bin drawn from `cutoff_bins`."""
    u = torch.rand(16, generator=g).tolist()
    x = db.T.float()
    if u[0] < st.p_room:
        x = room(x, 0.2 + 0.7 * u[1], 15.0 * u[2], hop_s)
    if u[3] < st.p_noise:
        x = noise_floor(x, 5.0 + 25.0 * u[4], -12.0 + 18.0 * u[5])
    if u[6] < st.p_lowpass:
        x = lowpass(x, cutoff_bins[0] + int(u[7] * (cutoff_bins[1] - cutoff_bins[0])))
    x = x.T.contiguous()  # (T, F)
    fill = x.mean()
    if u[8] < st.p_freq_mask:
        w = 1 + int(u[9] * 8)
        a = int(u[10] * (x.shape[1] - w))
        x[:, a:a + w] = fill
    if u[11] < st.p_time_mask:
        w = 1 + int(u[12] * 20)
        a = int(u[13] * (x.shape[0] - w))
        x[a:a + w] = fill
    return x


def mel_bin_of(hz: float, n_mels: int, rate: int) -> int:
    """Index of the first speechbrain-mel filter centred at or above `hz` (2595 log10(1 + f/700) scale)."""
    to_mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    centres = np.linspace(0.0, to_mel(rate / 2), n_mels + 2)[1:-1]
    return int(np.searchsorted(centres, to_mel(hz)))
