"""Engine vs the naive reference loop on the same settings, seed and clip, on CPU (issue: engine >= 3x).

    python bench/engine_vs_naive.py [--seconds 3] [--iterations 5] [--dec-dim 32] [--threads 2]

Prints the figures and writes bench/results/engine_vs_naive.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from naive import naive_window_delta  # bench/naive.py: a script's own folder is on sys.path

from cloak.bank import VoiceBank
from cloak.bundle import Models, prepare_diffvc
from cloak.config import ProtectConfig
from cloak.cpu import cpu_cores, cpu_model
from cloak.models import GE2E, DiffVC
from cloak.protect import ProtectionJob, run_jobs

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dec-dim", type=int, default=32)
    p.add_argument("--source-frames", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_vs_naive.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dv = DiffVC(channels=128, filters=512, heads=2, layers=4, enc_dim=16, spk_dim=32, dec_dim=a.dec_dim)
    with torch.no_grad():
        for n, prm in dv.named_parameters():
            if n.endswith(".g"):
                prm.fill_(0.1)
    dv = dv.eval().requires_grad_(False)
    models = Models(diffvc=prepare_diffvc(copy.deepcopy(dv)), ge2e=GE2E.load(), bank=VoiceBank(),
                    device=torch.device("cpu"))  # as load_models() prepares it
    x, sr = sf.read(str(sorted((CORPUS / "librispeech_1688").iterdir())[0]), dtype="float32")
    x = x[: int(a.seconds * sr)]
    # the naive loop takes the paper's plain sign step in the box: so does the engine here (shaping "none")
    cfg = ProtectConfig(iterations=a.iterations, repeats=a.repeats, source_frames=a.source_frames, gender="male",
                        window_seconds=max(10.0, a.seconds + 1), shaping="none")

    t = time.perf_counter()
    job = ProtectionJob(x, sr, models, cfg)
    job.prepare()
    setup_engine = time.perf_counter() - t
    t = time.perf_counter()
    run_jobs([job])
    engine_loop = time.perf_counter() - t
    engine_delta = job.delta22

    plain = Models(diffvc=copy.deepcopy(dv).to(memory_format=torch.contiguous_format), ge2e=models.ge2e,
                   bank=models.bank, device=models.device)  # the reference loop: plain layout, no engine tuning
    t = time.perf_counter()
    naive = naive_window_delta(x, sr, plain, cfg)
    naive_total = time.perf_counter() - t
    n = min(len(naive), len(engine_delta))
    agree = float(torch.mean((torch.sign(naive[:n]) == torch.sign(engine_delta[:n])).float()))
    res = {
        "bench": "engine_vs_naive", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": cpu_model(), "cores": cpu_cores(), "threads": a.threads,
        "clip_seconds": a.seconds, "model": {"dec_dim": a.dec_dim, "spk_dim": 32, "enc_dim": 16},
        "settings": {"iterations": a.iterations, "repeats": a.repeats, "t_adv": cfg.t_adv,
                     "source_frames": a.source_frames},
        "engine_setup_s": setup_engine, "engine_loop_s": engine_loop, "engine_total_s": setup_engine + engine_loop,
        "naive_total_s": naive_total, "speedup_total": naive_total / (setup_engine + engine_loop),
        "speedup_loop": naive_total / engine_loop, "delta_sign_agreement": agree,
    }
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
