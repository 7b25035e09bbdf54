"""Peak host memory of a protection's attack (the engine's side of a scheduler's memory budget).

Measured with VmHWM on CPU (`python -m server.memory` prints estimate vs. measurement), for the embedded model
(dec_dim 32), in MiB: 1.25 x (72 + 35.4 W + 15.7 R W + 1.02 R S + 0.047 P S + 3.64 R), W the attacked window in
seconds, R repeats, S source_frames, P the pool of draws (`cloak.attack.pool_size_for`): a least-squares fit over
20 runs (repeats 1-16, t_adv 2-8, source_frames 32-512, windows 2-20 s) whose largest under-estimate was 19 %
(hence the 1.25). All but the constant scale with the model's width (dec_dim / 32); on CUDA only the constant is
host memory (the rest is on the device). Where it goes at the defaults (7 s clip, bf16 CPU): torch and libraries
~0.22 GiB, models ~0.11 GiB, the window's set-up ~0.35-0.45 GiB, the U-Net terms' autograd graph ~1.1 GiB
(~0.22 GiB per repeat). The fit predates engine 8's micro-batched CPU steps (`Models.rows_per_pass`), which hold
the graph of 1-2 draws instead of R: `cloak protect` peaked at 1.29 GiB for the 7 s clip in bf16 (bench/footprint.py),
so on CPU the estimate is
now an upper bound (a server admits fewer jobs than would fit, never more).
"""

from __future__ import annotations

from .attack import pool_size_for
from .bundle import Models
from .config import ProtectConfig
from .features import DIFFVC_RATE
from .protect import plan_size

MIB = 1 << 20
UNET_MARGIN = 1.25  # the fit's largest under-estimate was 19 %


def activation_scale(models: Models | None) -> float:
    """Host activation memory of a model bundle relative to the embedded one (0 on CUDA: device memory)."""
    if models is None:
        return 1.0
    device = getattr(models, "device", None)
    if getattr(device, "type", "cpu") == "cuda":
        return 0.0
    dec_dim = getattr(getattr(getattr(models, "diffvc", None), "config", None), "dec_dim", 32)
    return max(0.25, float(dec_dim) / 32.0)


def attack_bytes(frames: int, sample_rate: int, cfg: ProtectConfig, scale: float = 1.0) -> int:
    """Peak host bytes of the attack on a clip of `frames` frames at `sample_rate` (one window at a time);
    `scale` from `activation_scale`."""
    w = plan_size(frames, sample_rate, cfg)[1] / DIFFVC_RATE
    p, r, s = pool_size_for(cfg), cfg.repeats, cfg.source_frames
    return int(UNET_MARGIN * MIB * (72 + scale * (35.4 * w + 15.7 * r * w + 1.02 * r * s + 0.047 * p * s + 3.64 * r)))


__all__ = ["activation_scale", "attack_bytes", "UNET_MARGIN"]
