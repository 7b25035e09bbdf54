"""Simulated recording conditions on DiffVC log-mels, for training the prior to take them from the reference.

Why: a clone made from a reverberant source keeps the source's room, and GE2E hears it. Measured with the shipped
cloak-mini 2 (30 sampler steps, clean reference of the same speaker, 3 training speakers): a source convolved with a
synthetic room (RT60 0.5 s, DRR 3 dB) lowered the self-clone's cosine to the speaker's enrollment by 0.06-0.12
(vctk_p226 0.873 -> 0.812, vctk_p227 0.838 -> 0.719, cmuarctic_bdl 0.772 -> 0.695). In prior training the source
crop and the target are one recording, so nothing teaches the prior that the room belongs to the reference. With
`PriorSettings.source_rooms` a random share of source crops passes through a simulated room and noise floor before
the encoder, while the target and the condition stay as recorded: the prior learns to drop the source's conditions
and keep those the condition (the same speaker's other recording) shares with the target.

The simulation works on the mel magnitudes themselves (the encoder input), as power-domain filtering per mel bin:
  * late reverberation: each bin's power convolved with an exponential decay of the bin's own RT60 (high bins decay
    faster, as absorption grows with frequency), scaled to a direct-to-reverberant ratio;
  * a stationary noise floor with a random spectral tilt at a signal-to-noise ratio over the crop's loud frames.
Both are choices, not measurements of real rooms: ranges wide enough to cover audiobook rooms and phone-like noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..features import DIFFVC_HOP, DIFFVC_RATE

LOG_FLOOR = math.log(1e-5)


@dataclass(frozen=True)
class RoomRanges:
    rt60_s: tuple[float, float] = (0.2, 0.9)  # RT60 at the lowest mel bin; the top bin decays hf_decay x faster
    hf_decay: float = 2.0
    drr_db: tuple[float, float] = (-3.0, 12.0)  # direct-to-reverberant energy ratio
    noise_p: float = 0.5  # share of augmented crops that also get a noise floor
    snr_db: tuple[float, float] = (15.0, 45.0)
    tilt_db: tuple[float, float] = (-12.0, 6.0)  # noise spectrum, top bin relative to the lowest


def reverberate(logmel: torch.Tensor, rt60_s: torch.Tensor, drr_db: float, max_s: float = 1.2) -> torch.Tensor:
    """Late reverberation of a (..., F, T) natural-log mel magnitude: per bin, power convolved causally with
    exp(-13.8 t / RT60_f) (60 dB of decay over RT60_f; `rt60_s` (F,)), the tail scaled so that direct energy /
    tail energy = `drr_db`."""
    n_frames = max(2, int(max_s * DIFFVC_RATE / DIFFVC_HOP))
    t = torch.arange(1, n_frames, dtype=logmel.dtype) * (DIFFVC_HOP / DIFFVC_RATE)  # the tail starts one frame later
    decay = torch.exp(-13.8 * t[None, :] / rt60_s.to(logmel.dtype)[:, None])  # (F, K)
    decay = decay / decay.sum(-1, keepdim=True) * 10 ** (-drr_db / 10)
    power = torch.exp(2 * logmel)
    flat = power.reshape(-1, *power.shape[-2:])  # (B, F, T)
    f, k = decay.shape
    padded = torch.nn.functional.pad(flat, (k, 0))  # causal: frame t hears frames t-1 .. t-K
    kernel = decay.flip(-1)[:, None, :]  # (F, 1, K), conv1d is a correlation
    tail = torch.nn.functional.conv1d(padded, kernel, groups=f)[..., : flat.shape[-1]]
    return (0.5 * torch.log(flat + tail)).clamp_min(LOG_FLOOR).reshape(logmel.shape)


def add_noise_floor(logmel: torch.Tensor, mask: torch.Tensor, snr_db: float, tilt_db: float) -> torch.Tensor:
    """A stationary noise floor under a (F, T) log-mel: white in the mel bins but for a linear tilt in dB, at
    `snr_db` below the mean power of the crop's frames (within `mask` (1, T))."""
    n_bins = logmel.shape[-2]
    power = torch.exp(2 * logmel)
    frames = mask.sum().clamp_min(1.0)
    signal = (power * mask).sum() / (frames * n_bins)
    shape = 10 ** (torch.linspace(0, tilt_db, n_bins, dtype=logmel.dtype) / 10)
    noise = shape / shape.mean() * signal * 10 ** (-snr_db / 10)
    return (0.5 * torch.log(power + noise[:, None])).clamp_min(LOG_FLOOR)


def random_room(logmel: torch.Tensor, mask: torch.Tensor, rng: random.Random,
                ranges: RoomRanges = RoomRanges()) -> torch.Tensor:
    """One crop (F, T) with `mask` (1, T) through a random room and, with probability `noise_p`, a noise floor."""
    n_bins = logmel.shape[-2]
    rt60 = rng.uniform(*ranges.rt60_s) / torch.linspace(1.0, ranges.hf_decay, n_bins)
    out = reverberate(logmel, rt60, rng.uniform(*ranges.drr_db))
    if rng.random() < ranges.noise_p:
        out = add_noise_floor(out, mask, rng.uniform(*ranges.snr_db), rng.uniform(*ranges.tilt_db))
    return torch.where(mask > 0, out, logmel)
