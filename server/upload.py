"""An accepted upload as the scheduler sees it: the validated header (server.pcm makes it from the wire's) and the
window plan its job will have (the engine's, cloak.protect.plan_size). No protobuf here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloak import ProtectConfig
from cloak.protect import plan_size

from .codec import DTYPES


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
        """(windows, samples per window at 22.05 kHz) of this upload's job (the engine's plan)."""
        return plan_size(self.frames, self.sample_rate, self.config)
