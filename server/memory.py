"""The memory budget (--memory-budget): uploads and jobs hold an estimate of their peak host memory from the
moment their header is accepted until they end; finished results hold their PCM bytes until pruned.

Why a reservation for the whole peak at the header: what is admitted can then always run (no queued job waits
for memory that other queued jobs hold), and a client learns before it sends a byte whether its job fits.

The estimate (bytes), measured with VmHWM on CPU (`python -m server.memory` prints estimate vs. measurement):
    upload       PCM bytes as received + the float32 samples they become
    job          float32 samples (4 per sample) + 64 per sample for the protected output, the checks and the
                 wire encoding (72 for int16, whose on-grid rounding works in float64) + 48 per sample of the
                 22.05 kHz mono mix (delta, cross-fade weights, resampling), + the engine's estimate of its attack
                 (cloak.footprint.attack_bytes: the U-Net's activations and draws). Jobs batched together add up.
The peak is the larger of the upload and the job; the budget is that of the whole server.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cloak.features import DIFFVC_RATE, resampled_length
from cloak.footprint import activation_scale, attack_bytes

from . import codec
from .upload import Upload

MIB = 1 << 20
PER_SAMPLE_OUT = 64  # bytes per input sample (frames x channels) while the result is made and encoded
PER_SAMPLE_OUT_INT16 = 72
PER_SAMPLE_22K = 48  # bytes per sample of the 22.05 kHz mono mix


@dataclass(frozen=True)
class Estimate:
    upload: int  # while receiving
    job: int  # while running (includes the samples)
    unet: int  # of which the U-Net's activations and draws
    dominant: str  # the field to name when it cannot fit: "header.frames" or "settings.repeats"

    @property
    def peak(self) -> int:
        return max(self.upload, self.job)


def estimate(up: Upload, scale: float = 1.0) -> Estimate:
    """Peak host memory of an upload and of its job; `scale` from cloak.footprint.activation_scale (0 when the
    U-Net runs on a GPU)."""
    samples = up.frames * up.channels
    n22 = resampled_length(up.frames, up.sample_rate, DIFFVC_RATE)
    unet = attack_bytes(up.frames, up.sample_rate, up.config, scale)
    out = PER_SAMPLE_OUT_INT16 if up.encoding == "int16" else PER_SAMPLE_OUT
    data = 4 * samples + out * samples + PER_SAMPLE_22K * n22
    upload = up.nbytes + 4 * samples
    return Estimate(upload, data + unet, unet, "settings.repeats" if unet > data else "header.frames")


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


# --- measuring the estimate (python -m server.memory --help) ----------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(models_dir: str | None, seconds: float, rate: int, channels: int, repeats: int, window: float,
            batch: int, encoding: str = "float32", source_frames: int = 192, t_adv: int = 6) -> tuple[int, int]:
    """(measured peak bytes above the resident models, estimate) for `batch` jobs run together (Linux: VmHWM,
    reset through /proc/self/clear_refs), one PGD iteration each, through the result and its wire encoding."""
    import hashlib

    import numpy as np

    from cloak import ProtectConfig, load_models
    from cloak.protect import ProtectionJob, run_jobs

    models = load_models(models_dir)
    frames = int(seconds * rate)
    cfg = ProtectConfig(iterations=1, repeats=repeats, t_adv=t_adv, window_seconds=window, source_frames=source_frames,
                        overlap_seconds=min(1.0, window / 2), gender="male")
    audio = (np.random.default_rng(0).standard_normal((frames, channels)) * 0.05).astype(np.float32)
    if channels == 1:
        audio = audio[:, 0]
    up = Upload(rate, channels, frames, encoding, hashlib.sha256(b"").hexdigest(), cfg)
    est = estimate(up, activation_scale(models))
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    jobs = [ProtectionJob(audio, rate, models, cfg) for _ in range(batch)]
    run_jobs(jobs, max_batch=batch)
    for job in jobs:
        res = job.result()
        codec.encode(res.audio, encoding, reference=job.samples, epsilon=cfg.epsilon)
        del res
    peak = _proc_status("VmHWM") - base
    return peak, batch * (est.job - 4 * up.frames * up.channels)  # the input array itself is outside both


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m server.memory",
                                description="Measure a job's peak host memory against server.memory's estimate.")
    p.add_argument("--models", help="model bundle (default: embedded)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=16000)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--encoding", choices=["float32", "int16"], default="float32")
    p.add_argument("--source-frames", type=int, default=192)
    p.add_argument("--t-adv", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    peak, est = measure(a.models, a.seconds, a.rate, a.channels, a.repeats, a.window, a.batch, a.encoding,
                        a.source_frames, a.t_adv)
    print(f"{a.seconds:g} s {a.rate} Hz {a.channels} ch {a.encoding}, repeats {a.repeats}, t_adv {a.t_adv}, source "
          f"frames {a.source_frames}, window {a.window:g} s, batch {a.batch}: measured {fmt(peak)} "
          f"({peak / MIB:.0f} MiB), estimated {fmt(est)} ({peak / est:.0%} of the estimate)")
    return 0 if peak <= est else 1


if __name__ == "__main__":
    raise SystemExit(main())
