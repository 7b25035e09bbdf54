"""The memory budget (--memory-budget): uploads and jobs hold an estimate of their peak host memory from the
moment their header is accepted until they end; finished results hold their PCM bytes until pruned.

Why a reservation for the whole peak at the header: what is admitted can then always run (no queued job waits
for memory that other queued jobs hold), and a client learns before it sends a byte whether its job fits.

The estimate (bytes), measured with VmHWM on CPU (`python -m server.memory` prints estimate vs. measurement):
    upload       PCM bytes as received + the float32 samples they become
    job          float32 samples (4 per sample) + 64 per sample for the protected output, the checks and the
                 wire encoding (72 for int16, whose on-grid rounding works in float64) + 48 per sample of the
                 22.05 kHz mono mix (delta, cross-fade weights, resampling)
    U-Net        CPU only (on CUDA it is device memory): for the embedded model (dec_dim 32), in MiB,
                 1.3 x (40 + 21 W + 1.5 P W + 14.4 R W + 17 P), W window seconds, R repeats, P the pool of
                 draws (2 max(repeats, t_adv), a multiple of t_adv); scaled by dec_dim / 32 for other models.
The peak is the larger of the upload and the job; the budget is that of the whole server.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from cloak.features import DIFFVC_HOP, DIFFVC_RATE

from . import pcm

MIB = 1 << 20
PER_SAMPLE_OUT = 64  # bytes per input sample (frames x channels) while the result is made and encoded
PER_SAMPLE_OUT_INT16 = 72
PER_SAMPLE_22K = 48  # bytes per sample of the 22.05 kHz mono mix
UNET_MARGIN = 1.3  # the fit's largest under-estimate was 21 %


@dataclass(frozen=True)
class Estimate:
    upload: int  # while receiving
    job: int  # while running (includes the samples)
    unet: int  # of which the U-Net's activations and draws
    dominant: str  # the field to name when it cannot fit: "header.frames" or "settings.repeats"

    @property
    def peak(self) -> int:
        return max(self.upload, self.job)


def pool_size(repeats: int, t_adv: int) -> int:
    base = 2 * max(repeats, t_adv)
    return math.ceil(base / t_adv) * t_adv


def estimate(up: pcm.Upload, unet_scale: float = 1.0) -> Estimate:
    """Peak host memory of an upload and of its job; unet_scale 0 when the U-Net runs on a GPU."""
    cfg = up.config
    samples = up.frames * up.channels
    n22 = math.ceil(up.frames * DIFFVC_RATE / up.sample_rate)
    window = max(DIFFVC_HOP * 32, int(cfg.window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)
    w = min(n22, window) / DIFFVC_RATE
    p = pool_size(cfg.repeats, cfg.t_adv)
    unet = int(unet_scale * UNET_MARGIN * MIB * (40 + 21 * w + 1.5 * p * w + 14.4 * cfg.repeats * w + 17 * p))
    out = PER_SAMPLE_OUT_INT16 if up.encoding == pcm.pb.SAMPLE_ENCODING_INT16 else PER_SAMPLE_OUT
    data = 4 * samples + out * samples + PER_SAMPLE_22K * n22
    upload = up.nbytes + 4 * samples
    return Estimate(upload, data + unet, unet, "settings.repeats" if unet > data else "header.frames")


def unet_scale(models: object | None) -> float:
    """Activation scale of a model bundle relative to the embedded one (0 on CUDA: not host memory)."""
    if models is None:
        return 1.0
    device = getattr(models, "device", None)
    if getattr(device, "type", "cpu") == "cuda":
        return 0.0
    dec_dim = getattr(getattr(getattr(models, "diffvc", None), "config", None), "dec_dim", 32)
    return max(0.25, float(dec_dim) / 32.0)


def fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class MemoryBudget:
    """Bytes held out of a fixed total (thread-safe)."""

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.total - self.used

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - int(n))
