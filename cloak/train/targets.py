"""A substitute for DiffVC's "average voice" encoder target.

The official encoder regresses phoneme-averaged mels built from forced alignments over many speakers. Without
aligners we build a target that keeps the content (spectral envelope over time: formants, voicing, energy)
and removes the two strongest identity cues a mel carries:
  1. pitch / harmonic fine structure: cepstral liftering of the log-mel along frequency keeps only the
     first `n_ceps` DCT coefficients (the envelope);
  2. the speaker's average timbre (vocal-tract length, spectral tilt, loudness): per-speaker mean/variance
     normalisation of the liftered log-mel, per mel bin over voiced frames, mapped onto the pooled statistics
     of all training speakers ("the average voice").
The encoder (MelEncoder + PostNet) learns mel -> target from one utterance, so at conversion time it must infer
the normalisation from the utterance itself, as the official encoder does.
"""

from __future__ import annotations

import numpy as np
import torch

LOG_FLOOR = float(np.log(1e-5))


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (i + 0.5) * k / n) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def lifter(mel: torch.Tensor, n_ceps: int = 24) -> torch.Tensor:
    """Smooth a (..., 80, T) log-mel along frequency by keeping n_ceps cepstral coefficients."""
    n = mel.shape[-2]
    d = torch.from_numpy(dct_matrix(n)).to(mel)
    keep = torch.zeros(n, dtype=mel.dtype, device=mel.device)
    keep[:n_ceps] = 1
    proj = d.T @ torch.diag(keep) @ d
    return torch.einsum("fg,...gt->...ft", proj, mel)


def voiced_frames(mel: torch.Tensor, margin: float = 4.0) -> torch.Tensor:
    """Frames whose mean log-mel is within `margin` nats of the utterance's loudest frames (T,) bool."""
    energy = mel.mean(0)
    return energy > (torch.quantile(energy, 0.95) - margin)


def speaker_stats(mels: list[torch.Tensor], n_ceps: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.cat([lifter(m, n_ceps)[:, voiced_frames(m)] for m in mels], 1)
    return frames.mean(1), frames.std(1).clamp_min(1e-3)


def average_voice_target(mel: torch.Tensor, spk_mean: torch.Tensor, spk_std: torch.Tensor,
                         glob_mean: torch.Tensor, glob_std: torch.Tensor, n_ceps: int = 24) -> torch.Tensor:
    """(80, T) log-mel -> speaker-normalised envelope in the pooled ("average voice") statistics."""
    env = lifter(mel, n_ceps)
    out = (env - spk_mean[:, None]) / spk_std[:, None] * glob_std[:, None] + glob_mean[:, None]
    return out.clamp_min(LOG_FLOOR)
