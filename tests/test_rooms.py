"""The simulated recording conditions used to train the prior (cloak.train.rooms)."""

import math
import random

import torch

from cloak.features import DIFFVC_HOP, DIFFVC_RATE
from cloak.train.rooms import LOG_FLOOR, add_noise_floor, random_room, reverberate


def _impulse(frames: int = 200, at: int = 50) -> torch.Tensor:
    x = torch.full((80, frames), LOG_FLOOR)
    x[:, at] = 0.0
    return x


def test_reverberation_decays_by_60_db_over_rt60_and_is_causal() -> None:
    rt60 = 0.5
    y = reverberate(_impulse(), torch.full((80,), rt60), drr_db=0.0)
    silence = reverberate(torch.full((80, 200), LOG_FLOOR), torch.full((80,), rt60), drr_db=0.0)
    assert torch.equal(y[:, :50], silence[:, :50])  # causal: nothing of the sound before it
    assert torch.allclose(y[:, 50], torch.zeros(80), atol=1e-6)  # the direct sound (the tail starts a frame later)
    k = round(rt60 * DIFFVC_RATE / DIFFVC_HOP)
    drop_db = 20 * (y[0, 51] - y[0, 51 + k]) / math.log(10)  # log magnitude -> dB
    assert 55.0 < float(drop_db) < 65.0


def test_direct_to_reverberant_ratio_is_the_tail_energy() -> None:
    for drr in (-3.0, 6.0):
        y = reverberate(_impulse(), torch.full((80,), 0.4), drr_db=drr)
        tail = torch.exp(2 * y[0, 51:]).sum() - torch.exp(torch.tensor(2 * LOG_FLOOR)) * 149
        assert abs(10 * math.log10(1.0 / float(tail)) - drr) < 0.2


def test_higher_bins_may_decay_faster() -> None:
    rt = torch.linspace(0.8, 0.2, 80)
    y = reverberate(_impulse(), rt, drr_db=0.0)
    assert y[0, 80] > y[79, 80] + 5  # 30 frames later the low bin still rings, the top bin has died away


def test_noise_floor_at_the_asked_snr_and_tilt() -> None:
    x = torch.zeros(80, 100)  # unit magnitude everywhere: signal power 1 per bin
    y = add_noise_floor(x, torch.ones(1, 100), snr_db=20.0, tilt_db=-10.0)
    noise = torch.exp(2 * y[:, 0]) - 1.0
    assert abs(10 * math.log10(float(noise.mean())) + 20.0) < 0.1
    assert abs(10 * math.log10(float(noise[-1] / noise[0])) + 10.0) < 0.1


def test_random_room_keeps_padding_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 120, generator=g) - 4.0
    mask = torch.ones(1, 120)
    mask[:, 100:] = 0
    a = random_room(x, mask, random.Random(3))
    b = random_room(x, mask, random.Random(3))
    assert torch.equal(a, b)
    assert torch.equal(a[:, 100:], x[:, 100:])
    assert (a[:, :100] >= x[:, :100] - 1e-5).all()  # a room and a noise floor only add energy
    assert (a[:, :100] - x[:, :100]).mean() > 0.05
