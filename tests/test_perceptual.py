"""Perceptual shaping (cloak.perceptual) on real speech, and its hook in the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLE, corpus_clip, to_rate

from cloak import ConfigError, ProtectConfig, protect
from cloak.evaluate.metrics import snr_db
from cloak.features import DIFFVC_RATE
from cloak.perceptual import (
    SHAPING_HOP,
    SNR_FLOOR_DB,
    active_speech_level,
    excess_fraction,
    masking_threshold,
    project_spectral,
    scale_to_level,
    snr_floor_power,
    spreading_matrix,
    stft,
    under_snr_floor,
)

FAST = dict(iterations=6, repeats=2, t_adv=3, source_frames=48, gender="male")


@pytest.fixture(scope="module")
def speech22() -> torch.Tensor:
    """The shipped sample (LibriSpeech, 16 kHz) at DiffVC's rate, 3 s, with 0.5 s of digital silence added."""
    x, sr = sf.read(str(SAMPLE), dtype="float32")
    x = to_rate(x[: 3 * sr], sr, DIFFVC_RATE)
    return torch.from_numpy(np.concatenate([np.zeros(DIFFVC_RATE // 2, np.float32), x]))


def test_active_level_ignores_pauses_and_follows_gain():
    x, sr = sf.read(str(SAMPLE), dtype="float32")
    level, activity = active_speech_level(x, sr)
    assert -45 < level < -10 and 0.3 < activity <= 1.0
    # a gain shifts the level by exactly its dB
    assert active_speech_level(0.1 * x, sr)[0] == pytest.approx(level - 20.0, abs=0.05)
    # two seconds of near-silence (-90 dBFS noise) lower the plain RMS but not the active speech level
    quiet = np.random.default_rng(0).normal(0, 10 ** (-90 / 20), 2 * sr).astype(np.float32)
    padded = np.concatenate([quiet, x, quiet])
    rms_db = 10 * math.log10(np.mean(padded.astype(np.float64) ** 2))
    assert rms_db < 10 * math.log10(np.mean(x.astype(np.float64) ** 2)) - 1.5
    assert active_speech_level(padded, sr)[0] == pytest.approx(level, abs=0.5)
    assert active_speech_level(np.zeros(sr, np.float32), sr) == (-math.inf, 0.0)


def test_active_level_of_a_steady_tone_is_its_rms():
    sr = 16000
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(2 * sr) / sr)
    level, activity = active_speech_level(tone, sr)
    assert level == pytest.approx(20 * math.log10(0.1 / math.sqrt(2)), abs=0.2) and activity > 0.95


def test_scale_to_level_hits_the_level_on_stereo():
    x, sr = corpus_clip("vctk_p225", 0)
    stereo = np.stack([x, x], 1)
    for target in (-26.0, -16.0):
        y = scale_to_level(stereo, sr, target)
        assert y.shape == stereo.shape and y.dtype == np.float32
        assert active_speech_level(y.mean(1), sr)[0] == pytest.approx(target, abs=0.01)


def test_spreading_redistributes_power_without_adding_any():
    s = spreading_matrix(DIFFVC_RATE)
    assert s.shape == (513, 513) and (s >= 0).all()
    np.testing.assert_allclose(s.sum(0), 1.0, rtol=1e-5)
    # a masker spreads further upwards (-10 dB/Bark) than downwards (-25 dB/Bark)
    j = 100
    assert s[j + 20, j] > s[j - 20, j]


def test_threshold_is_level_relative_and_silent_where_the_voice_is(speech22):
    thr = masking_threshold(speech22, DIFFVC_RATE, margin_db=20.0)
    louder = masking_threshold(4.0 * speech22, DIFFVC_RATE, margin_db=20.0)
    torch.testing.assert_close(louder, 4.0 * thr, rtol=1e-4, atol=1e-9)
    # 6 dB more margin halves the bound
    torch.testing.assert_close(masking_threshold(speech22, DIFFVC_RATE, margin_db=26.0), thr / 10 ** 0.3,
                               rtol=1e-4, atol=1e-9)
    # digital silence: no room at all (before the forward-masking hold of the first speech frames)
    lead = (DIFFVC_RATE // 2 - 1024) // SHAPING_HOP
    assert float(thr[:, :lead].max()) == 0.0
    # per frame, the bound's total power sits margin_db under the clean frame's power
    clean = stft(speech22).abs().square().sum(0)
    loud = clean > clean.max() * 1e-2
    ratio_db = 10 * torch.log10(thr.square().sum(0)[loud] / clean[loud])
    assert float(ratio_db.median()) == pytest.approx(-20.0, abs=1.5)


def test_exponent_bends_the_bound_between_masking_and_flat(speech22):
    flat = masking_threshold(speech22, DIFFVC_RATE, margin_db=30.0, exponent=0.0)
    half = masking_threshold(speech22, DIFFVC_RATE, margin_db=30.0, exponent=0.5)
    full = masking_threshold(speech22, DIFFVC_RATE, margin_db=30.0, exponent=1.0)
    # gamma = 0: one flat bound, white noise 30 dB under the active speech level
    assert float(flat.max() - flat.min()) <= 1e-6 * float(flat.max())
    level, _ = active_speech_level(speech22.numpy(), DIFFVC_RATE)
    white = 10 ** ((level - 30.0) / 20) * float(torch.hann_window(1024).square().sum().sqrt())
    assert float(flat[0, 0]) == pytest.approx(white, rel=1e-4)
    # gamma = 0.5: the geometric mean of the two, still level-relative and zero in digital silence
    torch.testing.assert_close(half, (flat * full).sqrt(), rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(masking_threshold(0.25 * speech22, DIFFVC_RATE, 30.0, exponent=0.5), 0.25 * half,
                               rtol=1e-3, atol=1e-9)
    assert float(half[:, :10].max()) == 0.0
    # weak cells get more room than under the masking threshold, strong ones less
    assert float(half.min()) < float(full.max()) and float((half > full).float().mean()) > 0.3


def test_projection_puts_delta_under_the_threshold(speech22):
    thr = masking_threshold(speech22, DIFFVC_RATE, margin_db=20.0)
    g = torch.Generator().manual_seed(0)
    noise = 0.002 * (torch.randint(0, 2, speech22.shape, generator=g).float() * 2 - 1)  # dense box-filling noise
    assert excess_fraction(noise, thr) > 0.5
    shaped = project_spectral(noise, thr)
    assert shaped.shape == noise.shape
    assert excess_fraction(shaped, thr) < 0.02  # the ISTFT round trip leaks a little over the bound
    assert excess_fraction(project_spectral(shaped, thr), thr) < excess_fraction(shaped, thr) / 2
    # the silent lead-in stays clean, the speech carries the perturbation
    lead = DIFFVC_RATE // 2 - 2048
    assert float(shaped[:lead].abs().max()) < 1e-7
    assert snr_db(speech22.numpy(), (speech22 + shaped).numpy()) > 18.0
    # a delta already under the bound is (nearly) left alone; projecting twice changes little
    small = project_spectral(0.01 * shaped, thr)
    torch.testing.assert_close(small, 0.01 * shaped, rtol=0, atol=1e-6)
    twice = project_spectral(shaped, thr)
    assert float((twice - shaped).norm() / shaped.norm()) < 0.2


def test_snr_floor_scales_only_a_delta_that_is_too_loud(speech22):
    g = torch.Generator().manual_seed(1)
    loud = 0.002 * torch.randn(speech22.shape, generator=g)
    assert snr_db(speech22.numpy(), (speech22 + loud).numpy()) < SNR_FLOOR_DB
    allowed = snr_floor_power(speech22)
    floored = under_snr_floor(loud, allowed)
    assert snr_db(speech22.numpy(), (speech22 + floored).numpy()) == pytest.approx(SNR_FLOOR_DB, abs=1e-3)
    torch.testing.assert_close(floored / floored.norm(), loud / loud.norm())  # the shape is kept
    quiet = 0.1 * floored
    assert torch.equal(under_snr_floor(quiet, allowed), quiet)  # already under the floor: bit for bit unchanged
    assert torch.equal(under_snr_floor(torch.zeros_like(loud), allowed), torch.zeros_like(loud))
    silence = snr_floor_power(torch.zeros_like(speech22))  # digital silence: no perturbation at all
    assert float(under_snr_floor(loud, silence).abs().max()) == 0.0


def test_engine_meets_the_snr_floor_where_the_bound_alone_would_not(tiny_models):
    """A margin that would put the cloak ~12 dB under the voice: the masking shaping still delivers its SNR floor
    (after resampling to 44.1 kHz and cross-fading two windows); the paper's box has no floor."""
    x, sr = corpus_clip("vctk_p226", 0, seconds=3.0)
    x = to_rate(0.05 * x / np.abs(x).max(), sr, 44_100)
    cfg = ProtectConfig(**FAST, step_size=4e-4, seed=3, masking_margin_db=12.0, masking_exponent=0.0,
                        window_seconds=2.0, overlap_seconds=0.5)
    shaped = protect(x, 44_100, tiny_models, cfg)
    assert SNR_FLOOR_DB - 0.5 <= shaped.metrics["snr_db"] < SNR_FLOOR_DB + 3
    assert np.abs(shaped.audio - x).max() <= cfg.epsilon + 1e-7
    assert protect(x, 44_100, tiny_models, cfg.with_(shaping="none")).metrics["snr_db"] < SNR_FLOOR_DB - 3


def test_shaping_settings_are_validated():
    assert ProtectConfig().shaping == "masking"
    assert ProtectConfig(shaping="none").shaping == "none"
    with pytest.raises(ConfigError, match="shaping"):
        ProtectConfig(shaping="psycho")
    with pytest.raises(ConfigError, match="masking_margin_db"):
        ProtectConfig(masking_margin_db=-1.0)
    with pytest.raises(ConfigError, match="masking_margin_db"):
        ProtectConfig(masking_margin_db=80.0)


def test_engine_keeps_pauses_clean_and_the_voice_louder_than_the_cloak(tiny_models):
    """Same clip and seed with and without shaping: the shaped cloak leaves the silent lead-in untouched, is
    quieter relative to the voice, and still holds the epsilon bound."""
    x, sr = corpus_clip("vctk_p226", 0, seconds=2.0)
    x = np.concatenate([np.zeros(sr // 2, np.float32), 0.3 * x / np.abs(x).max()])  # half a second of silence
    cfg = ProtectConfig(**FAST, epsilon=0.002, step_size=4e-4, seed=2)
    plain = protect(x, sr, tiny_models, cfg.with_(shaping="none"))
    shaped = protect(x, sr, tiny_models, cfg)
    d_plain, d_shaped = plain.audio - x, shaped.audio - x
    assert np.abs(d_shaped).max() <= cfg.epsilon + 1e-7
    lead = sr // 2 - sr // 20
    assert np.abs(d_plain[:lead]).max() > 1e-3  # the box alone fills the pause
    assert np.abs(d_shaped[:lead]).max() < 1e-5  # the shaped cloak leaves it (nearly) clean
    assert shaped.metrics["snr_db"] > plain.metrics["snr_db"] + 3
    assert np.abs(d_shaped[lead:]).max() > 1e-4  # and still perturbs the speech
    assert shaped.metrics["config"]["shaping"] == "masking"


def test_cli_flags_set_the_shaping():
    from clients import cli

    args = cli.build_parser().parse_args(["protect", "x.wav", "--shaping", "none", "--masking-margin-db", "30",
                                          "--masking-exponent", "0.5"])
    cfg = cli.resolve_settings(args, environ={}).config
    assert (cfg.shaping, cfg.masking_margin_db, cfg.masking_exponent) == ("none", 30.0, 0.5)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["protect", "x.wav", "--shaping", "loud"])
