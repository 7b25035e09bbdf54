"""The attacker's pipeline: convert source speech to the voice of a reference recording with DiffVC.

Source content and reference voice go through DiffVC as the official inference notebook does: the encoder's
"average voice" mean of the source, the reference entering twice (its mel for RefBlock / mean_ref, its GE2E
d-vector as c), the reverse SDE sampler, the notebook's mel spectral-subtraction post-filter, HiFi-GAN V1 at
22.05 kHz. Differences from the notebook: the reference's d-vector is computed after volume normalisation but
without webrtcvad silence trimming (not installed by default), and resampling uses a windowed-sinc resampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio import read_audio, to_mono, validate_samples, write_audio
from .bundle import Models
from .features import DIFFVC_RATE, GE2E_RATE, diffvc_mel, resample
from .jobs import Cancelled, CancelToken
from .models.ge2e import volume_gain
from .pitch import f0_contour

MODES = ("ml", "em", "pf")
LOG_FLOOR_NAT = float(np.log(1e-5))


@dataclass
class CloneResult:
    audio: np.ndarray  # (frames,) float32 at 22.05 kHz
    sample_rate: int
    mel: np.ndarray  # (80, T) converted log-mel (after the post-filter when on)


def _noise_median_smoothing(x: np.ndarray, w: int) -> np.ndarray:
    padded = np.pad(x, w, "edge")
    out = np.copy(x)
    for i in range(len(x)):
        out[i] = min(padded[i + w + 1], np.median(padded[i:i + 2 * w + 1]))
    return out


def mel_spectral_subtraction(mel_synth: np.ndarray, mel_source: np.ndarray, spectral_floor: float = 0.02,
                             silence_window: int = 5, smoothing_window: int | None = 5) -> np.ndarray:
    """The DiffVC notebook's post-filter: estimate a noise floor from the quietest `silence_window` frames of
    `mel_source`, subtract its energy from every frame of `mel_synth` (floored at spectral_floor x noise)."""
    n = mel_source.shape[-1]
    i_min, e_min = 0, np.inf
    for i in range(max(n - silence_window, 0)):
        e = float(np.sum(np.exp(2.0 * mel_source[:, i:i + silence_window])))
        if e < e_min:
            i_min, e_min = i, e
    noise = np.min(np.exp(2.0 * mel_synth[:, i_min:i_min + silence_window]), axis=-1)
    if smoothing_window is not None:
        noise = _noise_median_smoothing(noise, smoothing_window)
    signal = np.maximum(np.exp(2.0 * mel_synth) - noise[:, None], spectral_floor * noise[:, None])
    return np.log(np.sqrt(signal)).astype(mel_synth.dtype)


def reference_embedding(models: Models, wave22: torch.Tensor) -> torch.Tensor:
    w16 = resample(wave22, DIFFVC_RATE, GE2E_RATE)
    return models.ge2e.embed(w16 * volume_gain(w16))


@torch.no_grad()
def clone(source: np.ndarray, source_rate: int, reference: np.ndarray, reference_rate: int, models: Models,
          steps: int = 30, mode: str = "ml", seed: int | None = 0, postfilter: bool = True) -> CloneResult:
    """Convert `source` (what is said) to the voice of `reference` (whose voice)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be in [1, 1000], got {steps}")
    dev = models.device
    src = resample(torch.from_numpy(to_mono(validate_samples(source, source_rate, name="source"))),
                   source_rate, DIFFVC_RATE)
    ref = resample(torch.from_numpy(to_mono(validate_samples(reference, reference_rate, name="reference"))),
                   reference_rate, DIFFVC_RATE)
    src_mel = diffvc_mel(src[None].to(dev))
    pitch = None
    if models.prior is not None:  # the source's intonation, moved to the reference's pitch by the prior
        log_f0, voiced = f0_contour(src.numpy(), DIFFVC_RATE, src_mel.shape[-1])
        pitch = (torch.from_numpy(log_f0)[None, None].to(dev), torch.from_numpy(voiced)[None, None].float().to(dev))
    return convert_mel(models, src_mel, ref[None].to(dev), steps, mode, seed, postfilter, pitch)


def prior_mean(models: Models, src_mel: torch.Tensor, src_mask: torch.Tensor, pitch: tuple[torch.Tensor, ...],
               ref_mel: torch.Tensor, ref_mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The speaker-adaptive prior's mean for a conversion (models with a prior only): the source's average voice
    moved into the reference's voice, its F0 contour moved to the reference's predicted pitch statistics."""
    if models.prior is None:
        raise ValueError("this DiffVC has no speaker-adaptive prior")
    spk = models.prior.condition(c, ref_mel, ref_mask)
    return models.prior.convert_mean(models.diffvc.average_voice(src_mel, src_mask), src_mask, pitch[0], pitch[1],
                                     spk)


@torch.no_grad()
def convert_mel(models: Models, src_mel: torch.Tensor, ref22: torch.Tensor, steps: int = 30, mode: str = "ml",
                seed: int | None = 0, postfilter: bool = True,
                src_pitch: tuple[torch.Tensor, torch.Tensor] | None = None) -> CloneResult:
    """The conversion itself, from a source log-mel (1, 80, T) and a reference waveform (1, N) at 22.05 kHz, both
    on the models' device (the engine's early stop calls this with its surrogate source). `src_pitch`: the
    source's (log-F0, voiced) contours (1, 1, T) each, needed by models with a speaker-adaptive prior."""
    dev = models.device
    ref_mel = diffvc_mel(ref22)
    c = reference_embedding(models, ref22)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0 if seed is None else seed)
    mean = None
    if models.prior is not None:
        if src_pitch is None:
            raise ValueError("this DiffVC has a speaker-adaptive prior: pass the source's F0 contour (src_pitch)")
        mean = prior_mean(models, src_mel, torch.ones_like(src_mel[:, :1]), src_pitch, ref_mel,
                          torch.ones_like(ref_mel[:, :1]), c)
    mel = models.diffvc.convert(src_mel, torch.tensor([src_mel.shape[-1]], device=dev), ref_mel,
                                torch.tensor([ref_mel.shape[-1]], device=dev), c, steps, mode, generator=gen,
                                mean=mean)
    # a log-mel of real audio lies in [ln 1e-5, ~5]; clamping only matters for a diverged (untrained) model,
    # whose overflowing values would otherwise turn into inf/NaN in the post-filter and the vocoder
    mel_np = np.clip(np.nan_to_num(mel[0].float().cpu().numpy(), nan=LOG_FLOOR_NAT), LOG_FLOOR_NAT, 10.0)
    if postfilter:  # as the notebook calls it: both arguments are the converted mel
        mel_np = mel_spectral_subtraction(mel_np, mel_np)
    vocoder = models.vocoder()
    wave = vocoder(torch.from_numpy(mel_np)[None].to(dev))[0].float().cpu().numpy()
    return CloneResult(wave.astype(np.float32), DIFFVC_RATE, mel_np)


def clone_files(sources: list[Path], reference: Path, output: Path | None = None, *, models: Models,
                overwrite: bool = False, steps: int = 30, mode: str = "ml", seed: int | None = 0,
                postfilter: bool = True, cancel: CancelToken | None = None) -> list[dict[str, Any]]:
    """Clone every source to the reference's voice; outputs are float32 WAV at 22.05 kHz (atomic writes).
    `output`: a file for a single source, else a directory; default `<source>.clone.wav` beside the source."""
    ref = read_audio(reference)
    results = []
    many = len(sources) > 1
    if many and output is not None and output.suffix:
        raise ValueError("several sources need an output directory, not a file")
    for src_path in sources:
        if cancel is not None and cancel.cancelled:
            raise Cancelled("cloning cancelled")
        src = read_audio(src_path)
        if output is None:
            out = src_path.with_name(src_path.stem + ".clone.wav")
        elif many or output.is_dir():
            output.mkdir(parents=True, exist_ok=True)
            out = output / (src_path.stem + ".clone.wav")
        else:
            out = output
        r = clone(src.samples, src.sample_rate, ref.samples, ref.sample_rate, models, steps, mode, seed, postfilter)
        write_audio(out, r.audio, r.sample_rate, subtype="FLOAT", overwrite=overwrite, protect_original=src_path)
        results.append({"source": str(src_path), "reference": str(reference), "output": str(out),
                        "sample_rate": r.sample_rate, "seconds_audio": len(r.audio) / r.sample_rate,
                        "steps": steps, "mode": mode, "seed": seed, "postfilter": postfilter,
                        "model": models.diffvc_id})
    return results
