"""Front-ends against their reference implementations on real corpus speech."""

from __future__ import annotations

import sys
import types

import librosa
import numpy as np
import pytest
import torch
from conftest import corpus_clip

from cloak.features import (
    diffvc_mel,
    ge2e_frames_from_diffvc_mel,
    ge2e_mel,
    mel_filterbank,
    resample,
    resampled_length,
)
from cloak.models.ge2e import GE2E, partial_slices, resemblyzer_weights


def librosa_get_mel(wave: np.ndarray) -> np.ndarray:
    """DiffVC's get_mel recipe written with librosa (reference.md Sec. 1)."""
    wave = wave[: len(wave) // 256 * 256].astype(np.float64)
    y = np.pad(wave, (384, 384), mode="reflect")
    spec = librosa.stft(y, n_fft=1024, hop_length=256, win_length=1024, window="hann", center=False)
    mag = np.sqrt(np.abs(spec) ** 2 + 1e-9)
    basis = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000)
    return np.log(np.clip(basis @ mag, 1e-5, None))


@pytest.mark.parametrize("speaker,index", [("vctk_p225", 0), ("librispeech_1998", 1), ("cmuarctic_bdl", 0)])
def test_diffvc_mel_matches_librosa_recipe(corpus, speaker, index):
    x, sr = corpus_clip(speaker, index, seconds=4.0)
    w22 = resample(torch.from_numpy(x), sr, 22050)
    ours = diffvc_mel(w22[None])[0].double().numpy()
    ref = librosa_get_mel(w22.numpy())
    assert ours.shape == ref.shape == (80, len(w22) // 256)
    assert np.max(np.abs(ours - ref)) <= 1e-3


def test_mel_filterbanks_equal_librosa():
    for sr, n_fft, n_mels, fmax in [(22050, 1024, 80, 8000.0), (16000, 400, 40, None)]:
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0, fmax=fmax)
        np.testing.assert_allclose(mel_filterbank(sr, n_fft, n_mels, 0.0, fmax), ref, atol=1e-7)


def test_ge2e_mel_matches_librosa_melspectrogram(corpus):
    x, _ = corpus_clip("vctk_p226", 0, seconds=2.0)
    ref = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    ours = ge2e_mel(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6)


def _resemblyzer_encoder():
    """resemblyzer's VoiceEncoder without its package __init__ (whose webrtcvad import breaks on current
    setuptools): the real class, run on the same 16 kHz waveform."""
    root = resemblyzer_weights().parent
    saved = {k: sys.modules.get(k) for k in ("resemblyzer", "webrtcvad")}
    pkg = types.ModuleType("resemblyzer")
    pkg.__path__ = [str(root)]
    sys.modules["resemblyzer"] = pkg
    sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))
    import scipy.ndimage

    sys.modules.setdefault("scipy.ndimage.morphology", scipy.ndimage)
    try:
        from resemblyzer.voice_encoder import VoiceEncoder

        return VoiceEncoder("cpu", verbose=False)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)


@pytest.fixture(scope="module")
def ge2e():
    return GE2E.load()


@pytest.mark.parametrize("speaker,index,seconds", [("vctk_p225", 0, None), ("librispeech_2033", 2, None),
                                                   ("cmuarctic_rms", 1, 1.2)])
def test_ge2e_equals_resemblyzer_embed_utterance(corpus, ge2e, speaker, index, seconds):
    x, sr = corpus_clip(speaker, index, seconds)
    assert sr == 16000
    ref = _resemblyzer_encoder().embed_utterance(x, rate=1.25)
    ours = ge2e.embed_utterance(torch.from_numpy(x)[None])[0].numpy()
    assert float(np.dot(ref, ours)) >= 0.999
    assert abs(np.linalg.norm(ours) - 1) < 1e-5 and (ours >= 0).all()


def test_partials_step_80_frames():
    sl = partial_slices(16000 * 5)
    assert [b - a for a, b in sl] == [160] * len(sl)
    assert all(sl[i + 1][0] - sl[i][0] == 80 for i in range(len(sl) - 1))


def test_ge2e_is_differentiable_and_separates_speakers(corpus, ge2e):
    a1, _ = corpus_clip("vctk_p225", 0)
    a2, _ = corpus_clip("vctk_p225", 1)
    b1, _ = corpus_clip("librispeech_2414", 0)
    e = [ge2e.embed(torch.from_numpy(w)[None]) for w in (a1, a2, b1)]
    assert float((e[0] * e[1]).sum()) > float((e[0] * e[2]).sum())
    w = torch.from_numpy(a1)[None].requires_grad_(True)
    ge2e.embed(w).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_ge2e_hears_a_diffvc_mel_as_it_hears_the_waveform(corpus, ge2e):
    """GE2E on the filterbank map of DiffVC's log-mel (no vocoder) agrees with GE2E on the waveform and keeps
    speakers apart; the map is differentiable."""
    from cloak.models.ge2e import volume_gain

    def both(speaker: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, sr = corpus_clip(speaker, index, seconds=4.0)
        w = torch.from_numpy(x)[None]
        w16 = resample(w, sr, 16000)
        g = volume_gain(w16)
        with torch.no_grad():
            return ge2e.embed(w16 * g)[0], ge2e.embed_frames(ge2e_frames_from_diffvc_mel(diffvc_mel(
                resample(w, sr, 22050) * g)))[0]

    pairs = {s: both(s, 0) for s in ("vctk_p225", "librispeech_2414", "cmuarctic_bdl", "librispeech_1998")}
    for s, (wave, mel) in pairs.items():
        assert float(wave @ mel) > 0.88, s
    same = float(pairs["vctk_p225"][1] @ both("vctk_p225", 1)[1])
    other = float(pairs["vctk_p225"][1] @ pairs["librispeech_2414"][1])
    assert same > other + 0.1, (same, other)
    mel = diffvc_mel(0.01 * torch.randn(1, 44100, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    frames = ge2e_frames_from_diffvc_mel(mel)
    assert frames.shape[0] == 1 and frames.shape[2] == 40 and abs(frames.shape[1] - 200) <= 2
    ge2e.embed_frames(frames).sum().backward()
    assert torch.isfinite(mel.grad).all() and mel.grad.abs().sum() > 0


@pytest.mark.parametrize("sr,new", [(48000, 22050), (44100, 22050), (16000, 22050), (22050, 16000), (8000, 22050)])
def test_resample_is_differentiable_and_band_limited(sr, new):
    n = sr
    t = torch.arange(n) / sr
    x = torch.sin(2 * torch.pi * 440 * t)[None].requires_grad_(True)
    y = resample(x, sr, new)
    assert y.shape[-1] == resampled_length(n, sr, new)
    t2 = torch.arange(y.shape[-1]) / new
    ref = torch.sin(2 * torch.pi * 440 * t2)
    core = slice(new // 10, -new // 10)
    assert torch.max(torch.abs(y[0, core] - ref[core])) < 1e-2
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
