"""cloak.quality: the predicted audibility of a shaping bound and the per-window exponent, on real speech."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corpus_clip, to_rate

from cloak import ConfigError, ProtectConfig, protect
from cloak.features import DIFFVC_RATE, resample
from cloak.perceptual import masking_threshold, scale_to_level
from cloak.quality import EXPONENT_STEPS, disturbance, predicted_pesq, probe_delta, window_exponent

FAST = dict(iterations=4, repeats=2, t_adv=3, source_frames=48, gender="male")


def window(speaker: str, level: float, seconds: float = 4.0) -> torch.Tensor:
    x, sr = corpus_clip(speaker, 0, seconds=seconds)
    return torch.from_numpy(scale_to_level(to_rate(x, sr, DIFFVC_RATE), DIFFVC_RATE, level))


def test_disturbance_is_zero_for_no_change_and_grows_with_the_perturbation():
    x = window("vctk_p226", -26.0)
    bound = masking_threshold(x, DIFFVC_RATE, 26.0, exponent=0.25)
    d = probe_delta(x, bound, 0.002)
    assert disturbance(x, torch.zeros_like(x), DIFFVC_RATE) == 0.0
    values = [disturbance(x, s * d, DIFFVC_RATE) for s in (0.25, 0.5, 1.0)]
    assert 0.0 < values[0] < values[1] < values[2]
    # level-relative: the same clip and probe 10 dB louder give (nearly) the same disturbance
    assert disturbance(x * 3.162, d * 3.162, DIFFVC_RATE) == pytest.approx(values[2], rel=0.05)


def test_predicted_pesq_falls_with_the_disturbance_within_the_pesq_range():
    preds = [predicted_pesq(d) for d in (0.0, 1.0, 10.0, 50.0, 500.0)]
    assert preds[0] == pytest.approx(4.64)
    assert all(a > b for a, b in zip(preds, preds[1:], strict=False))
    assert 1.0 <= preds[-1] < 2.0


def test_probe_fills_the_bound_within_the_box():
    x = window("librispeech_1688", -16.0)
    bound = masking_threshold(x, DIFFVC_RATE, 26.0, exponent=0.0)
    d = probe_delta(x, bound, 0.002)
    assert d.abs().max() <= 0.002 + 1e-9
    assert torch.equal(d, probe_delta(x, bound, 0.002))  # its own fixed seed: reproducible


def test_a_higher_target_never_gets_a_flatter_exponent():
    """Bisection finds, for each target, an exponent that meets it while one 1/32 flatter does not."""
    x = window("vctk_p227", -26.0)
    targets = (3.0, 3.5, 3.8, 4.6)
    picks = [window_exponent(x, DIFFVC_RATE, 26.0, 0.002, t) for t in targets]
    gammas = [g for g, _, _ in picks]
    assert gammas == sorted(gammas) and gammas[0] < gammas[-1]
    step = 2.0 ** -EXPONENT_STEPS
    for (g, pred, bound), target in zip(picks, targets, strict=True):
        assert 0.0 <= g <= 1.0 and (g / step) == int(g / step)
        assert torch.allclose(bound, masking_threshold(x, DIFFVC_RATE, 26.0, exponent=g))
        if g < 1.0:  # met, and a step flatter is not
            assert pred >= target
            if g > 0.0:
                d = probe_delta(x, masking_threshold(x, DIFFVC_RATE, 26.0, exponent=g - step), 0.002)
                assert predicted_pesq(disturbance(x, d, DIFFVC_RATE)) < target
    assert picks[-1][0] == 1.0  # 4.6 is out of reach of this clip: the steepest bound, quietest


def test_prediction_tracks_real_pesq_on_corpus_speakers():
    """The probe's predicted PESQ-WB against P.862.2 itself, on speakers the fit never saw (it used corpus-train):
    within the fit's cross-validated error (bench/results/quality_model.json) plus room for a 4 s clip."""
    pytest.importorskip("pesq", reason="PESQ (the eval extra) is needed to check the prediction against it")
    from cloak.evaluate.metrics import pesq_wb

    errors = []
    for speaker in ("vctk_p226", "librispeech_1998", "cmuarctic_bdl"):
        x = window(speaker, -26.0)
        for gamma in (0.0, 0.5):
            d = probe_delta(x, masking_threshold(x, DIFFVC_RATE, 26.0, exponent=gamma), 0.002)
            measured = pesq_wb(x.numpy(), (x + d).numpy(), DIFFVC_RATE)
            errors.append(predicted_pesq(disturbance(x, d, DIFFVC_RATE)) - measured)
    assert np.sqrt(np.mean(np.square(errors))) < 0.3, errors
    assert max(errors) < 0.5, errors


def test_engine_uses_the_chosen_exponent_per_window(tiny_models):
    x, sr = corpus_clip("vctk_p226", 0, seconds=3.0)
    x = scale_to_level(x, sr, -26.0)
    res = protect(x, sr, tiny_models, ProtectConfig(**FAST, quality_target=3.9))
    (gamma,), (pred,) = res.metrics["masking_exponents"], res.metrics["predicted_pesq"]
    x22 = resample(torch.from_numpy(x), sr, DIFFVC_RATE)  # as the engine resamples
    assert (gamma, pred) == pytest.approx(window_exponent(x22, DIFFVC_RATE, 26.0, 0.002, 3.9)[:2], abs=1e-3)
    assert np.abs(res.audio - x).max() <= 0.002 + 1e-7
    fixed = protect(x, sr, tiny_models, ProtectConfig(**FAST, masking_exponent=0.5))
    assert fixed.metrics["masking_exponents"] == [0.5] and fixed.metrics["predicted_pesq"] == [None]


def test_quality_target_is_validated():
    assert ProtectConfig().masking_exponent is None  # the default: chosen per window
    for bad in (0.0, 1.0, 4.7):
        with pytest.raises(ConfigError, match="quality_target"):
            ProtectConfig(quality_target=bad)


def test_the_neighbouring_switches_are_still_validated():
    """The quality target's checks sit between the shaping's and the switches'; those keep theirs."""
    with pytest.raises(ConfigError, match="early_stop"):
        ProtectConfig(early_stop="yes")
    with pytest.raises(ConfigError, match="masking_exponent"):
        ProtectConfig(masking_exponent=1.5)
