"""Where the seconds before the first PGD iteration go (issue 18: start-up <= 3 s), in a fresh process.

    python bench/startup.py [--seconds 7] [--threads 1] [--precision auto] [--runs 2]

Each run is a new Python process (imports are not cached in-process) that times, in order: `import torch`, the rest
of the CLI's imports (`clients.cli`, hence `cloak`), `load_models()` split into its parts (checkpoint reads, DiffVC
construction, layout preparation, speaker-adaptive prior, GE2E, voice bank, checksums) by wrapping the functions it
calls, reading the clip, the first window's set-up (`ProtectionJob.prepare`), the first PGD iteration and a second
one (steady state). Prints a markdown table (median over runs) and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ORDER = ["import torch", "import clients.cli (cloak, numpy, soundfile)", "load_models: torch.load (all reads)",
         "load_models: DiffVC build + load_state_dict", "load_models: prepare_diffvc (layout)",
         "load_models: speaker prior", "load_models: GE2E", "load_models: sha256 of the checkpoint",
         "load_models: voice bank", "load_models: rest", "read clip", "first window set-up (prepare)",
         "first PGD iteration", "second PGD iteration (steady state)"]
BEFORE_FIRST = ORDER[:12]
READS = ORDER[2]


def child(seconds: float, threads: int, precision: str) -> dict[str, object]:
    """One cold start, timed stage by stage (runs in its own process)."""
    t = time.perf_counter()
    import torch

    stages: dict[str, float] = {"import torch": time.perf_counter() - t}
    torch.set_num_threads(threads)
    t = time.perf_counter()
    import clients.cli  # noqa: F401 - what `cloak protect` imports before it loads models
    stages["import clients.cli (cloak, numpy, soundfile)"] = time.perf_counter() - t

    import numpy as np
    import soundfile as sf

    import cloak.bundle as bundle
    from cloak.config import ProtectConfig
    from cloak.protect import ProtectionJob, pgd_step
    from cloak.sample import sample_path

    loads: list[str] = []
    read_s = [0.0]  # torch.load time so far: the other stages are timed exclusive of it
    real_load = torch.load

    def counted_load(f, *a, **k):  # type: ignore[no-untyped-def]
        loads.append(str(f))
        t0 = time.perf_counter()
        try:
            return real_load(f, *a, **k)
        finally:
            read_s[0] += time.perf_counter() - t0
            stages[READS] = read_s[0]

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t0, r0 = time.perf_counter(), read_s[0]
            try:
                return fn(*a, **k)
            finally:
                spent = time.perf_counter() - t0 - (read_s[0] - r0)
                stages[name] = stages.get(name, 0.0) + spent
        return wrapper

    torch.load = counted_load  # type: ignore[assignment]
    wrapped = {"load_diffvc": "load_models: DiffVC build + load_state_dict",
               "diffvc_from_checkpoint": "load_models: DiffVC build + load_state_dict",
               "prepare_diffvc": "load_models: prepare_diffvc (layout)", "load_prior": "load_models: speaker prior",
               "prior_from_checkpoint": "load_models: speaker prior",
               "sha256_file": "load_models: sha256 of the checkpoint",
               "VoiceBank": "load_models: voice bank"}
    for attr, name in wrapped.items():
        if hasattr(bundle, attr):
            setattr(bundle, attr, timed(name, getattr(bundle, attr)))
    ge2e_load = bundle.GE2E.load
    bundle.GE2E.load = timed("load_models: GE2E", ge2e_load)  # type: ignore[method-assign]
    t = time.perf_counter()
    models = bundle.load_models(None, "cpu", precision)
    total = time.perf_counter() - t
    torch.load = real_load  # type: ignore[assignment]
    parts = [n for n in ORDER if n.startswith("load_models: ") and n != "load_models: rest"]
    stages["load_models: rest"] = total - sum(stages.get(n, 0.0) for n in parts)
    stages["load_models (total)"] = total

    t = time.perf_counter()
    x, sr = sf.read(str(sample_path()), dtype="float32")
    reps = int(np.ceil(seconds * sr / len(x)))
    x = np.tile(x, reps)[: int(seconds * sr)]
    stages["read clip"] = time.perf_counter() - t
    cfg = ProtectConfig(iterations=2, gender="auto", window_seconds=max(10.0, seconds + 1))
    job = ProtectionJob(x, sr, models, cfg)
    t = time.perf_counter()
    job.prepare()
    stages["first window set-up (prepare)"] = time.perf_counter() - t
    for name in ("first PGD iteration", "second PGD iteration (steady state)"):
        t = time.perf_counter()
        pgd_step([job])
        stages[name] = time.perf_counter() - t
    return {"stages": stages, "torch_loads": loads, "precision": models.precision}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=7.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "startup.json"))
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.seconds, a.threads, a.precision)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(a.runs):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(a.seconds), "--threads",
                              str(a.threads), "--precision", a.precision], env=env, cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        run["process_wall_s"] = time.perf_counter() - t
        runs.append(run)
    names = ORDER + ["load_models (total)"]
    med = {n: statistics.median(r["stages"].get(n, 0.0) for r in runs) for n in names}
    before = statistics.median(sum(r["stages"].get(n, 0.0) for n in BEFORE_FIRST) for r in runs)
    from cloak.cpu import cpu_cores, cpu_model

    res = {"bench": "startup", "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cores": cpu_cores(), "threads": a.threads, "precision": runs[0]["precision"], "clip_seconds": a.seconds,
           "runs": a.runs, "median_s": med, "before_first_iteration_s": before,
           "torch_loads": runs[0]["torch_loads"], "per_run": runs,
           "load_average": os.getloadavg()}
    print(f"start-up on {res['cpu']} ({res['cores']} cores, {a.threads} thread(s), {res['precision']}, "
          f"{a.seconds:g} s clip; median of {a.runs} fresh processes; load average {res['load_average'][0]:.2f})\n")
    print("| stage | s |\n|---|---:|")
    for n in names:
        print(f"| {n} | {med[n]:.3f} |")
    print(f"| **before the first iteration** | **{before:.2f}** |")
    print(f"\ncheckpoint reads (torch.load): {len(runs[0]['torch_loads'])}: "
          + ", ".join(Path(f).name for f in runs[0]["torch_loads"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
