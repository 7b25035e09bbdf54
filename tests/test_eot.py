"""Expectation over transformation (cloak.eot): the draws, each transform's forward and gradient, and a protection
that uses them (tiny models, real speech)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corpus_clip, to_rate

from cloak import ConfigError, ProtectConfig, protect
from cloak import eot as E
from cloak.features import DIFFVC_RATE, GE2E_RATE, resample
from cloak.models.ge2e import volume_gain
from cloak.mp3 import mp3_roundtrip

FAST = dict(iterations=6, repeats=2, t_adv=3, source_frames=48, gender="male")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one-thread runs are the bit-reproducible ones
    yield
    torch.set_num_threads(before)


def speech22(seconds: float = 2.0) -> torch.Tensor:
    x, sr = corpus_clip("vctk_p226", 0, seconds=seconds)
    return torch.from_numpy(to_rate(x, sr, DIFFVC_RATE)).float()


def test_plan_is_seeded_covers_the_names_and_stays_in_range():
    names = ("mp3", "resample", "gain")
    plan = E.draw_plan(names, 200, torch.Generator().manual_seed(3))
    assert plan == E.draw_plan(names, 200, torch.Generator().manual_seed(3))
    assert plan != E.draw_plan(names, 200, torch.Generator().manual_seed(4))
    counts = {n: sum(d.name == n for d in plan) for n in ("none", *names)}
    assert all(c >= 30 for c in counts.values()), counts  # uniform over none + 3 names: ~50 each
    assert {d.value for d in plan if d.name == "mp3"} == set(map(float, E.MP3_KBPS))
    gains_db = [20 * np.log10(d.value) for d in plan if d.name == "gain"]
    assert max(np.abs(gains_db)) <= E.GAIN_DB and min(gains_db) < -1 and max(gains_db) > 1
    assert {d.value for d in plan if d.name == "resample"} == {float(E.RESAMPLE_RATE)}


def test_no_eot_draws_nothing_from_the_generator():
    g = torch.Generator().manual_seed(0)
    assert E.draw_plan((), 50, g) == []
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(0)))


def test_mp3_is_the_codec_forward_and_the_identity_backward():
    x = speech22().requires_grad_(True)
    y = E.mp3_straight_through(x, 64, 44_100)
    assert y.shape == x.shape
    err = (y - x).detach()
    snr = 10 * torch.log10(x.detach().pow(2).sum() / err.pow(2).sum())
    assert 5 < float(snr) < 40, float(snr)  # changed by the codec, still the same speech, aligned
    # the decoded audio is what an MP3 round trip at 44.1 kHz gives
    up = to_rate(x.detach().numpy(), DIFFVC_RATE, 44_100)
    ref = to_rate(mp3_roundtrip(up, 44_100, 64)[: up.size], 44_100, DIFFVC_RATE)[: x.shape[0]]
    np.testing.assert_allclose(y.detach().numpy()[: ref.size], ref, atol=1e-6)
    w = torch.randn_like(x)
    g, = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(g, w)


def test_resample_removes_the_band_above_8k_and_keeps_the_gradient():
    x = (speech22() + 0.01 * torch.randn(2 * DIFFVC_RATE)).requires_grad_(True)
    y, gain = E.apply(E.Draw("resample", E.RESAMPLE_RATE), x, torch.ones(1), 22_050)
    assert y.shape == x.shape and float(gain) == 1.0
    spec = torch.fft.rfft(y.detach()).abs().pow(2)
    freqs = torch.fft.rfftfreq(x.shape[0], 1 / DIFFVC_RATE)
    band = spec[freqs > 8_300].sum() / spec.sum()
    assert float(band) < 1e-4
    g, = torch.autograd.grad(y.sum(), x)
    assert float(g.abs().sum()) > 0


def test_gain_scales_the_audio_and_sets_ge2e_to_the_new_level():
    x = speech22() * 0.05  # quiet: GE2E's increase-only normalisation applies
    x16 = resample(x[None], DIFFVC_RATE, GE2E_RATE)
    plan = E.with_ge2e_gains([E.Draw("gain", 10 ** (2.5 / 20)), E.Draw("none")], x16)
    y, gain = E.apply(plan[0], x.clone().requires_grad_(True), torch.full((1,), volume_gain(x16)), 22_050)
    torch.testing.assert_close(y.detach(), x * plan[0].value)
    assert float(gain) == pytest.approx(volume_gain(x16 * plan[0].value))
    assert float(gain) == pytest.approx(volume_gain(x16) / plan[0].value, rel=1e-4)  # normalised back
    assert plan[1].ge2e_gain is None
    with pytest.raises(ValueError, match="with_ge2e_gains"):
        E.apply(E.Draw("gain", 1.2), x, torch.ones(1), 22_050)


def test_settings_name_the_transforms():
    assert ProtectConfig(eot=("gain", "mp3", "gain")).eot == ("gain", "mp3")
    with pytest.raises(ConfigError, match="eot must be a subset"):
        ProtectConfig(eot=("flac",))
    with pytest.raises(ConfigError, match="list of transform names"):
        ProtectConfig(eot="mp3")


def test_protection_with_eot_is_bounded_seeded_and_not_the_plain_one(tiny_models):
    x, sr = corpus_clip("vctk_p225", 0, seconds=1.0)
    cfg = ProtectConfig(**FAST, eot=("mp3", "resample", "gain"))
    runs = [protect(x, sr, tiny_models, cfg).audio for _ in range(2)]
    plain = protect(x, sr, tiny_models, ProtectConfig(**FAST)).audio
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], plain)
    assert np.abs(runs[0].astype(np.float64) - x).max() <= cfg.epsilon + 1e-7
