"""Server throughput: concurrent clients on loopback, cross-job batching on vs off.

    python bench/serve_bench.py [--clients 8] [--jobs 1] [--seconds 2] [--iterations 3] [--repeats 2]
                                [--max-batch 8] [--models DIR | --random tiny|small] [--device cpu] [--threads 2]

For each mode (--max-batch 1 = no cross-job batching, then --max-batch K) a fresh in-process server on
127.0.0.1 (real gRPC, same resident models) gets `clients` concurrent RemoteProtector clients, each protecting
`jobs` clips of equal length one after another (equal window lengths, so jobs can share U-Net batches). Reports
jobs/s, p50/p95 latency (submit to result, including upload and queueing) and the mean batch size, prints the
figures and writes bench/results/serve_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from clients.remote import RemoteProtector
from cloak import ProtectConfig, load_models
from server.app import CloakServer
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


RANDOM_SIZES = {  # DiffVC widths of randomly initialised models (no checkpoint needed)
    "tiny": dict(channels=32, filters=64, heads=2, layers=2, enc_dim=16, spk_dim=16, dec_dim=16),  # the tests'
    "small": dict(channels=128, filters=512, heads=2, layers=4, enc_dim=16, spk_dim=32, dec_dim=32),  # engine bench's
    "official": {},  # the official DiffVC sizes (the GPU target)
}


def random_models(size: str, device: str = "cpu", precision: str = "auto") -> object:
    from cloak.bank import VoiceBank
    from cloak.bundle import Models
    from cloak.models import GE2E, DiffVC

    torch.manual_seed(0)
    dv = DiffVC(**RANDOM_SIZES[size])
    with torch.no_grad():
        for n, prm in dv.named_parameters():
            if n.endswith(".g"):
                prm.fill_(0.1)
    from cloak.bundle import prepare_diffvc, resolve_precision

    dev = torch.device(device)
    prepare_diffvc(dv, dev)  # as load_models prepares it
    return Models(diffvc=dv, ge2e=GE2E.load(device=dev), bank=VoiceBank(), device=dev).with_precision(
        resolve_precision(precision, dev))


def clips(n: int, seconds: float) -> list[tuple[np.ndarray, int]]:
    files = sorted(p for d in sorted(CORPUS.iterdir()) if d.is_dir() for p in sorted(d.iterdir())
                   if p.suffix in (".wav", ".flac"))
    out = []
    for f in files:
        x, sr = sf.read(str(f), dtype="float32")
        if x.ndim == 2:
            x = x.mean(axis=1)
        if len(x) >= seconds * sr:
            out.append((x[: int(seconds * sr)], sr))
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"no corpus clip of {seconds} s under {CORPUS}")
    while len(out) < n:
        out.append(out[len(out) % len(out)])
    # equal length at one rate, so every job's windows have the same shape
    rate = out[0][1]
    return [(x, sr) for x, sr in out if sr == rate] or out[:1]


def run_mode(models: object, max_batch: int, a: argparse.Namespace, data: list[tuple[np.ndarray, int]],
             cfg: ProtectConfig) -> dict:
    srv = CloakServer(ServerConfig(listen="127.0.0.1:0", max_batch=max_batch, max_queue=max(16, 2 * a.clients),
                                   device=a.device), models=models)
    srv.start()
    try:
        with RemoteProtector(srv.address) as rp:  # warm-up (first-call allocations, thread pools)
            rp.protect(data[0][0], data[0][1], cfg.with_(iterations=1))
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            with RemoteProtector(srv.address, client_name=f"bench-{i}") as rp:
                for j in range(a.jobs):
                    x, sr = data[(i * a.jobs + j) % len(data)]
                    t = time.perf_counter()
                    try:
                        rp.protect(x, sr, cfg.with_(seed=i * 1000 + j))
                    except Exception as e:  # noqa: BLE001
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")
                        continue
                    with lock:
                        lat.append(time.perf_counter() - t)

        steps0, iters0 = srv.scheduler.stats["steps"], srv.scheduler.stats["job_iterations"]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        steps = srv.scheduler.stats["steps"] - steps0
        iters = srv.scheduler.stats["job_iterations"] - iters0
    finally:
        srv.drain(timeout=0)
        srv.stop(grace=0.5)
    lat.sort()
    return {
        "max_batch": max_batch,
        "jobs": len(lat),
        "errors": errors,
        "wall_s": wall,
        "jobs_per_s": len(lat) / wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else None,
        "latency_mean_s": statistics.fmean(lat) if lat else None,
        "mean_batch": iters / max(steps, 1),
        "job_iterations_per_s": iters / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1, help="jobs per client, one after another")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--source-frames", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--models", metavar="DIR", help="model bundle (default: the embedded cloak-mini when installed, "
                                                   "else --random small)")
    p.add_argument("--random", choices=sorted(RANDOM_SIZES), help="a randomly initialised DiffVC of this width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_bench.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    from cloak.bundle import EMBEDDED_DIFFVC

    if a.random is None and a.models is None and not EMBEDDED_DIFFVC.is_file():
        a.random = "small"
    models = (random_models(a.random, a.device, a.precision) if a.random
              else load_models(a.models, a.device, a.precision))
    load_s = time.perf_counter() - t
    data = clips(a.clients * a.jobs, a.seconds)
    cfg = ProtectConfig(iterations=a.iterations, repeats=a.repeats, t_adv=min(6, max(2, a.repeats)),
                        source_frames=a.source_frames, gender="male")
    modes = [run_mode(models, 1, a, data, cfg), run_mode(models, a.max_batch, a, data, cfg)]
    off, on = modes
    result = {
        "bench": "serve_bench",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor(),
        "precision": models.precision,
        "cpu": platform.machine(),
        "threads": a.threads,
        "models": f"random {a.random}: {RANDOM_SIZES[a.random]}" if a.random else (a.models or "embedded cloak-mini"),
        "model_load_s": load_s,
        "clients": a.clients,
        "jobs_per_client": a.jobs,
        "clip_seconds": a.seconds,
        "settings": {"iterations": cfg.iterations, "repeats": cfg.repeats, "t_adv": cfg.t_adv,
                     "source_frames": cfg.source_frames},
        "batching_off": off,
        "batching_on": on,
        "throughput_gain": on["jobs_per_s"] / off["jobs_per_s"] if off["jobs_per_s"] else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    for name, m in (("batching off", off), (f"batching on (max_batch {a.max_batch})", on)):
        print(f"{name:28s} {m['jobs']} jobs in {m['wall_s']:.1f} s: {m['jobs_per_s']:.3f} jobs/s, "
              f"p50 {m['latency_p50_s']:.2f} s, p95 {m['latency_p95_s']:.2f} s, mean batch {m['mean_batch']:.2f}"
              + (f", {len(m['errors'])} errors" if m["errors"] else ""))
    print(f"throughput gain {result['throughput_gain']:.2f}x -> {out}")


if __name__ == "__main__":
    main()
