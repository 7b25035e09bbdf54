"""Protection speed on one device: wall time, iterations/s, peak memory, achieved FLOP/s vs a measured peak.

    python bench/protect.py --device cpu --model mini --seconds 7            # cloak-mini (embedded), paper settings
    python bench/protect.py --device cuda --model official-shaped --seconds 7 --jobs 8

official-shaped = random weights at the official DiffVC sizes (speed does not depend on weight values).
FLOPs are counted with torch's FlopCounterMode on one PGD iteration (forward + backward); the peak is a
matmul measured on the same device in the same run. JSON goes to bench/results/protect-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode

from cloak.bank import VoiceBank
from cloak.bundle import Models, load_models, prepare_diffvc, resolve_precision
from cloak.config import ProtectConfig
from cloak.models import GE2E, DiffVC
from cloak.protect import ProtectionJob, pgd_step, run_jobs

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def clip(seconds: float) -> tuple[np.ndarray, int]:
    parts, sr = [], 16000
    for f in sorted((CORPUS / "librispeech_1688").iterdir()):
        x, sr = sf.read(str(f), dtype="float32")
        parts.append(x)
        if sum(map(len, parts)) >= seconds * sr:
            break
    return np.concatenate(parts)[: int(seconds * sr)], sr


def models_for(kind: str, device: torch.device, precision: str = "auto", compile: bool = False) -> Models:
    if kind == "mini":
        return load_models(None, device, precision, compile)
    torch.manual_seed(0)
    dv = DiffVC()
    with torch.no_grad():
        for n, p in dv.named_parameters():
            if n.endswith(".g"):
                p.fill_(0.1)
    prepare_diffvc(dv, device, compile)  # as load_models prepares it
    return Models(diffvc=dv, ge2e=GE2E.load(device=device), bank=VoiceBank(), device=device,
                  compiled=compile).with_precision(resolve_precision(precision, device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["mini", "official-shaped"], default="mini")
    p.add_argument("--seconds", type=float, default=7.0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (compile time is excluded: "
                   "the FLOP-count probe iteration compiles it)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    models = models_for(a.model, dev, a.precision, a.compile)
    x, sr = clip(a.seconds)
    cfg = ProtectConfig(iterations=a.iterations, gender="male", window_seconds=max(10.0, a.seconds + 1))
    peak = measured_peak_flops(dev, torch.bfloat16 if models.precision == "bf16" else torch.float32)

    probe = ProtectionJob(x, sr, models, cfg.with_(iterations=1))
    probe.prepare()
    with FlopCounterMode(display=False) as fc:
        pgd_step([probe])
    flops_per_iter = fc.get_total_flops()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    jobs = [ProtectionJob(x, sr, models, cfg.with_(seed=i)) for i in range(a.jobs)]
    run_jobs(jobs, max_batch=a.jobs)
    results = [j.result() for j in jobs]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    iters = a.iterations * a.jobs * max(r.metrics["windows"] for r in results)
    achieved = flops_per_iter * iters / wall
    res = {
        "bench": "protect", "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": models.precision, "compiled": models.compiled,
        "model": a.model, "diffvc_params": sum(q.numel() for q in
                                                                                 models.diffvc.parameters()),
        "clip_seconds": a.seconds, "jobs": a.jobs, "settings": {k: v for k, v in cfg.to_dict().items()
                                                                if k in ("iterations", "repeats", "t_adv",
                                                                         "source_frames")},
        "wall_s": wall, "iterations_per_s": iters / wall, "flops_per_iteration": flops_per_iter,
        "achieved_flops": achieved, "peak_matmul_flops": peak, "fraction_of_peak": achieved / peak,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "snr_db": float(np.mean([r.metrics["snr_db"] for r in results])),
    }
    print(json.dumps(res, indent=2))
    name = f"protect-{dev.type}-{a.model}-{models.precision}{'-compiled' if a.compile else ''}-{a.jobs}job.json"
    out = Path(a.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
