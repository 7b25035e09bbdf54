"""The speaker-adaptive prior (cloak-mini 2): pitch contours, the prior's pieces, strict loading, and that the
engine's objective reaches the reference through every path (d-vector, reference mel -> prior, RefBlock)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import corpus_clip, tiny_diffvc

from cloak.bundle import BundleError, load_models
from cloak.features import DIFFVC_RATE, diffvc_mel
from cloak.models.prior import PriorConfig, SpeakerPrior, harmonic_templates, load_prior, shift_contour
from cloak.pitch import contour_stats, f0_contour

TINY_PRIOR = PriorConfig(hidden=32, cond_dim=16, layers=2)


def test_f0_contour_of_a_tone_and_its_frame_grid():
    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 150 * t) * (t > 0.5)  # silence, then a 150 Hz tone
    frames = int(1.5 * DIFFVC_RATE) // 256
    log_f0, voiced = f0_contour(x.astype(np.float32), sr, frames)
    assert log_f0.shape == voiced.shape == (frames,)
    centres = (np.arange(frames) * 256 + 128) / DIFFVC_RATE
    assert not voiced[centres < 0.45].any() and voiced[(centres > 0.6) & (centres < 1.4)].all()
    assert np.allclose(np.exp(log_f0[voiced]), 150.0, rtol=0.01)
    assert np.isfinite(log_f0).all()  # unvoiced frames are interpolated (held at the ends), never NaN


def test_f0_contour_separates_male_and_female_speech(corpus):
    means = {}
    for spk in ("librispeech_2414", "vctk_p225"):  # M, F
        x, sr = corpus_clip(spk, 0)
        frames = int(len(x) * DIFFVC_RATE / sr) // 256
        means[spk] = math.exp(contour_stats(*f0_contour(x, sr, frames))[0])
    assert 70 < means["librispeech_2414"] < 170 < means["vctk_p225"] < 300, means


def test_shift_contour_takes_the_target_statistics_on_voiced_frames():
    g = torch.Generator().manual_seed(0)
    log_f0 = 4.8 + 0.2 * torch.randn(2, 1, 50, generator=g)
    voiced = (torch.rand(2, 1, 50, generator=g) > 0.3).float()
    out = shift_contour(log_f0, voiced, torch.tensor([5.3, 4.6]), torch.tensor([0.1, 0.05]))
    for b, (m, s) in enumerate(((5.3, 0.1), (4.6, 0.05))):
        v = out[b, 0][voiced[b, 0] > 0]
        assert abs(float(v.mean()) - m) < 1e-5 and abs(float(v.std(unbiased=False)) - s) < 1e-5


def test_harmonic_template_peaks_where_the_harmonics_are():
    from cloak.features import mel_centre_frequencies

    tmpl = harmonic_templates(np.array([200.0]))[0]
    centres = mel_centre_frequencies()
    centre_bin = lambda hz: int(np.argmin(np.abs(centres - hz)))  # noqa: E731
    between = centre_bin(300.0)
    assert tmpl[centre_bin(200.0)] > tmpl[between] + 1.0 and tmpl[centre_bin(400.0)] > tmpl[between] + 1.0


def _tiny_prior(seed: int = 0) -> SpeakerPrior:
    torch.manual_seed(seed)
    p = SpeakerPrior(TINY_PRIOR)
    with torch.no_grad():  # a fresh prior's output layer is zero: give the residual path something to do
        p.post.weight.normal_(0, 0.05)
    return p.eval()


def test_prior_output_follows_the_reference_and_is_differentiable_in_it(corpus):
    prior = _tiny_prior()
    x, sr = corpus_clip("vctk_p225", 0, seconds=2.0)
    from cloak.features import resample

    w = resample(torch.from_numpy(x), sr, DIFFVC_RATE)[None].requires_grad_(True)
    ref = diffvc_mel(w)
    mask = torch.ones(1, 1, ref.shape[-1])
    c = torch.nn.functional.normalize(torch.randn(1, 256), dim=-1)
    src = diffvc_mel(resample(torch.from_numpy(corpus_clip("librispeech_2414", 0, 1.0)[0]), 16000, DIFFVC_RATE)[None])
    smask = torch.ones(1, 1, src.shape[-1])
    log_f0, voiced = torch.full((1, 1, src.shape[-1]), 4.8), torch.ones(1, 1, src.shape[-1])
    spk = prior.condition(c, ref, mask)
    out = prior.convert_mean(src, smask, log_f0, voiced, spk)
    assert out.shape == src.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # the reference waveform reaches the mean
    # a louder reference gives a louder mean: the reference's envelope statistics are put into it
    with torch.no_grad():
        loud = prior.convert_mean(src, smask, log_f0, voiced, prior.condition(c, ref + 1.0, mask))
    assert float((loud - out.detach()).mean()) == pytest.approx(1.0, abs=0.15)


def _save_v2(path, diffvc, prior) -> None:
    torch.save({"format": "cloak-mini-2", "config": diffvc.config.to_dict(), "state_dict": diffvc.state_dict(),
                "prior_config": prior.config.to_dict(), "prior_state_dict": prior.state_dict(), "meta": {}}, path)


def test_checkpoint_with_prior_loads_strict_and_without_prior_gives_none(tmp_path, corpus):
    dv, prior = tiny_diffvc(), _tiny_prior()
    (tmp_path / "v2").mkdir()
    _save_v2(tmp_path / "v2" / "diffvc.pt", dv, prior)
    got = load_prior(str(tmp_path / "v2" / "diffvc.pt"))
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                                      prior.state_dict().values(), strict=True))
    models = load_models(tmp_path / "v2")
    assert models.prior is not None
    (tmp_path / "v1").mkdir()
    torch.save({"config": dv.config.to_dict(), "state_dict": dv.state_dict(), "meta": {}},
               tmp_path / "v1" / "diffvc.pt")
    assert load_prior(str(tmp_path / "v1" / "diffvc.pt")) is None
    state = prior.state_dict()
    state.pop("post.bias")
    (tmp_path / "bad").mkdir()
    torch.save({"config": dv.config.to_dict(), "state_dict": dv.state_dict(), "prior_config": prior.config.to_dict(),
                "prior_state_dict": state, "meta": {}}, tmp_path / "bad" / "diffvc.pt")
    with pytest.raises(BundleError, match="post.bias"):
        load_models(tmp_path / "bad")


def test_official_state_dict_has_no_prior(tmp_path):
    torch.save(tiny_diffvc().state_dict(), tmp_path / "raw.pt")
    assert load_prior(str(tmp_path / "raw.pt")) is None


@pytest.fixture(scope="module")
def embedded():
    return load_models()


def test_every_loss_term_reaches_the_reference_through_the_shipped_model(embedded, corpus):
    """With the embedded cloak-mini 2, each term has a gradient with respect to the reference samples, and the
    prior's path is part of it: the attention-context and semantic terms are not zero at a random start."""
    from cloak.attack import WindowAttack, objective
    from cloak.config import ProtectConfig
    from cloak.features import resample

    assert embedded.prior is not None
    x, sr = corpus_clip("vctk_p226", 0, seconds=2.0)
    x22 = resample(torch.from_numpy(x), sr, DIFFVC_RATE)
    cfg = ProtectConfig(repeats=2, t_adv=2, seed=0, source_frames=64)
    attack = WindowAttack(embedded, cfg, x22, sr, torch.Generator().manual_seed(0))
    idx = attack.next_indices(0)
    g = torch.Generator().manual_seed(1)
    start = ((torch.rand(attack.x.shape[-1], generator=g) * 2 - 1) * cfg.epsilon)[None]
    for name in ("id", "ctx", "score", "sem", "voice"):
        delta = start.clone().requires_grad_(True)
        loss = objective([attack], delta, [idx])[0][name]
        grad, = torch.autograd.grad(loss, delta)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the prior path itself: the shipped prior's mean moves with the reference waveform, inside the graph
    from cloak.clone import prior_mean, reference_embedding

    ref = attack.x.clone().requires_grad_(True)
    ref_mel = diffvc_mel(ref)
    crop = attack.sources[0]
    src = crop.mel[None]
    mean = prior_mean(embedded, src, torch.ones(1, 1, src.shape[-1]), (crop.log_f0[None], crop.voiced[None]),
                      ref_mel, torch.ones(1, 1, ref_mel.shape[-1]), reference_embedding(embedded, ref))
    grad, = torch.autograd.grad(mean.pow(2).sum(), ref)
    assert grad.abs().sum() > 0


def test_voice_term_pulls_from_the_first_step_and_moves_the_clone_voice(embedded):
    """L_voice (GE2E on the prior's mean) is at its minimum-free start at delta = 0, so unlike L_ctx it has a
    gradient there; a few sign steps raise it, i.e. the voice the prior renders for the surrogate sources moves away
    from the clean reference's (the quantity the clone's identity follows with this model)."""
    from cloak.attack import WindowAttack, objective
    from cloak.config import ProtectConfig
    from cloak.features import resample

    x, sr = corpus_clip("librispeech_1998", 0, seconds=2.5)
    x22 = resample(torch.from_numpy(x), sr, DIFFVC_RATE)
    cfg = ProtectConfig(repeats=2, t_adv=2, seed=0, source_frames=64, losses=("voice",))
    attack = WindowAttack(embedded, cfg, x22, sr, torch.Generator().manual_seed(0))
    idx = attack.next_indices(0)
    delta = torch.zeros(1, attack.x.shape[-1], requires_grad=True)
    start = objective([attack], delta, [idx])[0]["voice"]
    assert set(objective([attack], delta.detach(), [idx])[0]) == {"voice"}
    # at delta = 0 the adversarial and clean means are equal: cosine 1, the loss is cos(., opposite centroid)
    at_zero = (attack.pool.voice_clean[idx] * attack.voice_centroid).sum(-1).mean()
    assert float(start.detach()) == pytest.approx(float(at_zero), abs=2e-3)
    grad, = torch.autograd.grad(start, delta)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    d = torch.zeros_like(delta)
    for _ in range(5):
        d = d.detach().requires_grad_(True)
        g, = torch.autograd.grad(objective([attack], d, [idx])[0]["voice"], d)
        d = (d + 4e-4 * g.sign()).clamp(-0.002, 0.002)
    assert float(objective([attack], d.detach(), [idx])[0]["voice"]) > float(start) + 0.01


def test_voice_term_needs_a_prior(tiny_models):
    """A model without a speaker-adaptive prior skips L_voice in the default set and refuses a voice-only job
    before any work."""
    from cloak import protect
    from cloak.config import ProtectConfig

    x, sr = corpus_clip("vctk_p225", 0, seconds=1.0)
    fast = {"iterations": 1, "repeats": 1, "t_adv": 1, "source_frames": 32}
    r = protect(x, sr, tiny_models, ProtectConfig(**fast))
    assert "voice" not in r.metrics["losses_end"] and "id" in r.metrics["losses_end"]
    with pytest.raises(BundleError, match="speaker-adaptive prior"):
        protect(x, sr, tiny_models, ProtectConfig(**fast, losses=("voice",)))


def test_scale_frequency_moves_a_formant_by_the_factor_and_is_differentiable():
    from cloak.features import mel_centre_frequencies
    from cloak.models.prior import scale_frequency

    freqs = mel_centre_frequencies()
    mel = torch.full((1, 80, 3), -5.0)
    i = int(np.argmin(np.abs(freqs - 1000.0)))
    mel[0, i] = 0.0  # a peak near 1 kHz
    factor = torch.tensor([1.2], requires_grad=True)
    out = scale_frequency(mel, factor)
    peak = float((torch.softmax(out[0, :, 0] * 10, 0) * torch.from_numpy(freqs).float()).sum())
    assert peak == pytest.approx(1.2 * freqs[i], rel=0.04)
    assert torch.equal(scale_frequency(mel, torch.ones(1)), mel)  # factor 1 is the identity
    out.sum().backward()
    assert factor.grad is not None and factor.grad.abs() > 0


def test_early_stop_clones_through_the_prior(embedded, corpus):
    """The engine's attacker check converts its surrogate source with the source's F0 contour, as `cloak clone`."""
    pytest.importorskip("onnxruntime")
    from cloak import ProtectConfig, protect

    x, sr = corpus_clip("vctk_p226", 0, seconds=2.0)
    r = protect(x, sr, models=embedded, config=ProtectConfig(seed=0, iterations=2, early_stop=True,
                                                                 early_stop_every=1))
    (check,), = r.metrics["early_stop_checks"]
    assert -1 <= check["identity"] <= 1 and 1.0 <= check["ovrl"] <= 5.0


def test_units_replace_each_source_frame_by_its_nearest_unit_and_need_their_buffer():
    prior = SpeakerPrior(PriorConfig(n_units=3))
    prior.units.copy_(torch.stack([torch.full((80,), -1.0), torch.zeros(80), torch.full((80,), 2.0)]))
    z = torch.stack([torch.full((80,), v) for v in (-0.7, 0.2, 1.4, 5.0)], -1)[None]  # (1, 80, 4)
    q = prior.quantise(z)
    assert torch.equal(q[0, 0], torch.tensor([-1.0, 0.0, 2.0, 2.0]))
    # the base mean is built from the units: two sources whose frames fall on the same units give the same base
    spk = prior.condition(torch.randn(1, 256), torch.randn(1, 80, 50) - 4, torch.ones(1, 1, 50))
    a = prior.base_mean(z, torch.ones(1, 1, 4), spk, (torch.zeros(1, 80), torch.ones(1, 80)))
    b = prior.base_mean(z + 0.1, torch.ones(1, 1, 4), spk, (torch.zeros(1, 80), torch.ones(1, 80)))
    assert torch.equal(a, b)
    state = {k: v for k, v in prior.state_dict().items() if k != "units"}
    with pytest.raises(RuntimeError, match="units"):
        SpeakerPrior(PriorConfig(n_units=3)).load_state_dict(state, strict=True)
    SpeakerPrior(PriorConfig()).load_state_dict(state, strict=True)  # no units: the checkpoints before them
