"""The one interface speaker encoders share: embed a 16 kHz waveform batch, differentiably."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SpeakerEncoder(Protocol):
    name: str
    sample_rate: int
    checksum: str | None

    def embed(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, N) waveform at `sample_rate` -> (B, D) L2-normalised embeddings, differentiable."""
        ...
