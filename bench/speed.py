"""CPU protection speed, side by side in one process: fp32 vs bf16, 7 s vs 60 s clips, 1 vs N threads (issue 18).

    python bench/speed.py                                    # fp32 + bf16 (where native), 7 s + 60 s, 1 thread
    python bench/speed.py --seconds 7 --threads 1 2 --iterations 4    # the thread-count comparison
    python -m bench ...                                       # the same, from the repository root

Every case runs the real engine (`ProtectionJob` + `run_jobs`, the embedded cloak-mini, the paper's settings except
`--iterations`) on the same clip (the shipped sample, repeated to length). Per case: wall time, the set-up of each
window (U-Net targets, surrogate sources: time to a window's first iteration minus one iteration), the median time
of one PGD iteration, and the paper-settings time extrapolated from them (50 iterations per window). The 60 s case
checks that cost stays linear: time(60 s) <= 1.1 x (60/7) x time(7 s). Prints a markdown table and writes JSON
(CPU model, cores, load average before and after: other processes on the cores change everything) to
bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HERE = Path(__file__).resolve().parent

from cloak import Progress  # noqa: E402
from cloak.bundle import Models, load_models  # noqa: E402
from cloak.config import ProtectConfig  # noqa: E402
from cloak.cpu import cpu_bf16_flags, cpu_cores, cpu_model  # noqa: E402
from cloak.protect import ProtectionJob, run_jobs  # noqa: E402
from cloak.sample import sample_path  # noqa: E402

PAPER_ITERATIONS = 50


def clip(seconds: float) -> tuple[np.ndarray, int]:
    """The shipped 5.6 s LibriSpeech sample, repeated to `seconds`."""
    x, sr = sf.read(str(sample_path()), dtype="float32")
    n = int(seconds * sr)
    return np.tile(x, int(np.ceil(n / len(x))))[:n], sr


def run_case(models: Models, seconds: float, iterations: int, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    x, sr = clip(seconds)
    cfg = ProtectConfig(iterations=iterations, gender="female", seed=0)  # the sample's speaker is female
    stamps: list[tuple[int, int, float]] = []

    def progress(p: Progress) -> None:
        stamps.append((p.window, p.iteration, time.perf_counter()))

    job = ProtectionJob(x, sr, models, cfg, progress=progress)
    t0 = time.perf_counter()
    run_jobs([job])
    wall = time.perf_counter() - t0
    result = job.result()
    windows = int(result.metrics["windows"])
    steps = [b[2] - a[2] for a, b in zip(stamps, stamps[1:], strict=False) if b[0] == a[0]]  # within a window
    per_iter = statistics.median(steps) if steps else wall / max(1, windows * iterations)
    setup = (wall - per_iter * len(stamps)) / windows  # per window: everything that is not an iteration
    return {"seconds": seconds, "threads": threads, "precision": models.precision, "iterations": iterations,
            "windows": windows, "wall_s": wall, "iteration_s": per_iter, "iteration_s_all": steps,
            "setup_per_window_s": setup, "paper_settings_estimate_s": windows * (setup + PAPER_ITERATIONS * per_iter),
            "snr_db": float(result.metrics["snr_db"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, nargs="+", default=[7.0, 60.0])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, plus bf16 where the CPU has native bf16")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--iterations", type=int, default=2, help="per window (the paper: 50; time is extrapolated)")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    a = p.parse_args(argv)
    precisions = a.precision or (["fp32", "bf16"] if cpu_bf16_flags() else ["fp32"])
    load_before = os.getloadavg()
    t = time.perf_counter()
    base = load_models(None, "cpu", "fp32")
    load_s = time.perf_counter() - t
    cases = []
    for prec in precisions:
        models = base if prec == "fp32" else base.with_precision(prec)
        for threads in a.threads:
            for seconds in a.seconds:
                case = run_case(models, seconds, a.iterations, threads)
                print(f"  {prec} {threads} thread(s) {seconds:g} s: {case['wall_s']:.1f} s, "
                      f"{case['iteration_s']:.2f} s/iteration", file=sys.stderr, flush=True)
                cases.append(case)
    for prec in precisions:  # linear in length: time(L) <= 1.1 x (L / l) x time(l), shortest clip as reference
        for threads in a.threads:
            mine = sorted((c for c in cases if c["precision"] == prec and c["threads"] == threads),
                          key=lambda c: c["seconds"])
            for c in mine[1:]:
                bound = 1.1 * c["seconds"] / mine[0]["seconds"] * mine[0]["wall_s"]
                c["linear_bound_s"], c["linear_ok"] = bound, c["wall_s"] <= bound
    res = {"bench": "speed", "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": cpu_cores(), "native_bf16": list(cpu_bf16_flags()), "torch": torch.__version__,
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "load_models_s": load_s,
           "model": "cloak-mini (embedded)", "settings": "paper's (repeats 5, t_adv 6, 192 source frames) except "
           f"{a.iterations} iterations per window", "cases": cases}
    print(f"\n{res['cpu']}, {res['cores']} cores, native bf16: {', '.join(res['native_bf16']) or 'none'}; "
          f"load average {load_before[0]:.2f} before, {res['load_average_after'][0]:.2f} after; "
          f"{a.iterations} iterations per window\n")
    print("| clip | precision | threads | windows | s / iteration | set-up / window (s) | measured (s) "
          "| paper settings, extrapolated (s) | linear |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for c in cases:
        lin = "" if "linear_ok" not in c else ("yes" if c["linear_ok"] else "NO") + f" (≤ {c['linear_bound_s']:.0f} s)"
        print(f"| {c['seconds']:g} s | {c['precision']} | {c['threads']} | {c['windows']} | {c['iteration_s']:.2f} "
              f"| {c['setup_per_window_s']:.2f} | {c['wall_s']:.1f} | {c['paper_settings_estimate_s']:.0f} | {lin} |")
    for threads in a.threads:
        for seconds in a.seconds:
            by = {c["precision"]: c for c in cases if c["threads"] == threads and c["seconds"] == seconds}
            if "fp32" in by and "bf16" in by:
                print(f"\nbf16 vs fp32, {seconds:g} s, {threads} thread(s): "
                      f"{by['fp32']['iteration_s'] / by['bf16']['iteration_s']:.2f}x per iteration, "
                      f"{by['fp32']['wall_s'] / by['bf16']['wall_s']:.2f}x wall")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
