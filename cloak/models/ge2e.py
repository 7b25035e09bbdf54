"""GE2E d-vector speaker encoder (the one DiffVC conditions on), differentiable end to end.

Weights: `pretrained.pt` of Real-Time-Voice-Cloning, shipped byte-identical inside the `resemblyzer` wheel.
The file is found through package metadata (or the import system's spec of the package, which locates it without
executing it); resemblyzer itself is never imported (its import chain breaks on current setuptools).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..features import GE2E_HOP, GE2E_RATE, ge2e_mel

PARTIAL_FRAMES = 160
DIFFVC_FRAME_STEP = 80  # resemblyzer rate=1.25 -> 80-frame step, what DiffVC uses
MIN_COVERAGE = 0.75
TARGET_DBFS = -30.0


def resemblyzer_weights() -> Path:
    """Path of `resemblyzer/pretrained.pt` in the installed resemblyzer distribution, found without importing
    resemblyzer (whose import chain pulls librosa and webrtcvad and breaks on current setuptools): first in the
    distribution's file list (importlib.metadata), else in the package directory the import system would load
    it from (importlib.util.find_spec of a top-level package locates it without executing it)."""
    found = False
    try:
        dist = metadata.distribution("resemblyzer")
    except metadata.PackageNotFoundError:
        pass
    else:
        found = True
        for f in dist.files or []:
            if str(f).replace("\\", "/").endswith("resemblyzer/pretrained.pt"):
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    spec = importlib.util.find_spec("resemblyzer")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        found = True
        path = Path(location) / "pretrained.pt"
        if path.is_file():
            return path
    if not found:
        raise FileNotFoundError("the GE2E weights come from the 'resemblyzer' package, which is not installed: "
                                "pip install resemblyzer==0.1.4 (or give a path to pretrained.pt)")
    raise FileNotFoundError("resemblyzer is installed but resemblyzer/pretrained.pt is missing from it")


def _unit(raw: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (as resemblyzer does; a zero row stays zero)."""
    return raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True).clamp_min(1e-12)


def partial_slices(n_samples: int, frame_step: int = DIFFVC_FRAME_STEP,
                   min_coverage: float = MIN_COVERAGE) -> list[tuple[int, int]]:
    """(start, stop) mel-frame ranges of the 160-frame partials (resemblyzer's `compute_partial_slices`)."""
    n_frames = int(math.ceil((n_samples + 1) / GE2E_HOP))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    start = slices[-1][0] * GE2E_HOP
    coverage = (n_samples - start) / (PARTIAL_FRAMES * GE2E_HOP)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


def volume_gain(wave: np.ndarray | torch.Tensor, target_dbfs: float = TARGET_DBFS) -> float:
    """Increase-only gain that brings the waveform to target dBFS (RTVC `normalize_volume`)."""
    x = wave.detach().double().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float64)
    rms = float(np.sqrt(np.mean((x * 32767) ** 2)))
    if rms == 0.0:
        return 1.0
    change = target_dbfs - 20 * math.log10(rms / 32767)
    return 1.0 if change < 0 else float(10 ** (change / 20))


class GE2E(nn.Module):
    """LSTM(40 -> 256, 3 layers) -> Linear(256, 256) -> ReLU -> L2 norm."""

    name = "ge2e"
    sample_rate = GE2E_RATE
    dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()
        self.checksum: str | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> GE2E:
        """Load RTVC/DiffVC `pretrained.pt` ({'model_state': ...}); None = the weights inside resemblyzer."""
        path = resemblyzer_weights() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GE2E weights not found: {path}")
        blob = path.read_bytes()
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a GE2E checkpoint ({e})") from e
        state = ckpt.get("model_state", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict with 'model_state'")
        state = {k: v for k, v in state.items() if not k.startswith("similarity_")}
        model = cls()
        model.load_state_dict(state, strict=True)
        model.checksum = hashlib.sha256(blob).hexdigest()
        model.requires_grad_(False)
        return model.to(device).eval()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, frames, 40) power mel -> (B, 256) unit-norm embeddings."""
        _, (hidden, _) = self.lstm(frames)
        return _unit(self.relu(self.linear(hidden[-1])))

    def partials(self, frames: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """(B, T, 40) power-mel frames -> (B, S, 256) embeddings of the 160-frame partials starting at `starts`."""
        idx = starts[:, None] + torch.arange(PARTIAL_FRAMES, device=frames.device)[None, :]
        parts = frames[:, idx]  # (B, S, 160, 40)
        b, s = parts.shape[:2]
        return self(parts.reshape(b * s, PARTIAL_FRAMES, -1)).reshape(b, s, -1)

    def partial_embeddings(self, wave_16k: torch.Tensor, frame_step: int = DIFFVC_FRAME_STEP) -> torch.Tensor:
        """(B, N) -> (B, n_partials, 256)."""
        wave = wave_16k if wave_16k.dim() == 2 else wave_16k.unsqueeze(0)
        slices = partial_slices(wave.shape[-1], frame_step)
        stop = slices[-1][1] * GE2E_HOP
        if stop >= wave.shape[-1]:
            wave = nn.functional.pad(wave, (0, stop - wave.shape[-1]))
        mel = ge2e_mel(wave)
        return self.partials(mel, torch.tensor([s for s, _ in slices], device=mel.device))

    def embed_frames(self, frames: torch.Tensor, frame_step: int = DIFFVC_FRAME_STEP) -> torch.Tensor:
        """(B, T, 40) power-mel frames -> (B, 256) utterance embeddings: the mean of the 160-frame partials every
        `frame_step` frames (one partial, zero-padded, when T < 160), normalised. For features that do not come
        from a waveform (`cloak.features.ge2e_frames_from_diffvc_mel`)."""
        t = frames.shape[1]
        if t < PARTIAL_FRAMES:
            frames = nn.functional.pad(frames, (0, 0, 0, PARTIAL_FRAMES - t))
            t = PARTIAL_FRAMES
        starts = torch.arange(0, t - PARTIAL_FRAMES + 1, frame_step, device=frames.device)
        return _unit(self.partials(frames, starts).mean(1))

    def embed_utterance(self, wave_16k: torch.Tensor, frame_step: int = DIFFVC_FRAME_STEP) -> torch.Tensor:
        """Utterance d-vector as resemblyzer `embed_utterance(wav, rate=1.25)`: (B, N) at 16 kHz -> (B, 256)."""
        return _unit(self.partial_embeddings(wave_16k, frame_step).mean(1))

    def embed(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """The SpeakerEncoder interface: differentiable (B, N) -> (B, 256)."""
        return self.embed_utterance(wave_16k)
