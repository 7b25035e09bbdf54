"""An accepted upload as the scheduler sees it: the validated header (server.pcm makes it from the wire's) and the
window plan its job will have. No protobuf here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cloak import ProtectConfig
from cloak.features import DIFFVC_HOP, DIFFVC_RATE

from .codec import DTYPES


def window_plan_size(frames: int, sample_rate: int, window_seconds: float, overlap_seconds: float) -> tuple[int, int]:
    """(windows, samples per window at 22.05 kHz) that ProtectionJob will use (for estimates only)."""
    n22 = math.ceil(frames * DIFFVC_RATE / sample_rate)
    window = max(DIFFVC_HOP * 32, int(window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)
    if n22 <= window:
        return 1, max(n22, DIFFVC_HOP * 16)
    overlap = int(overlap_seconds * DIFFVC_RATE)
    return math.ceil((n22 - overlap) / (window - overlap)), window


@dataclass(frozen=True)
class Upload:
    """A validated header: what the PCM must look like."""

    sample_rate: int
    channels: int
    frames: int
    encoding: str  # a server.codec encoding name
    sha256: str
    config: ProtectConfig

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.encoding]

    @property
    def nbytes(self) -> int:
        return self.frames * self.channels * self.dtype.itemsize

    def plan_size(self) -> tuple[int, int]:
        """(windows, samples per window at 22.05 kHz) of this upload's job (for estimates only)."""
        return window_plan_size(self.frames, self.sample_rate, self.config.window_seconds,
                                self.config.overlap_seconds)
