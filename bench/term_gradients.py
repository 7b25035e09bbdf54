"""Does every loss term pull? Per-term gradient norms and sign agreement at the start and the end of a PGD run.

    OMP_NUM_THREADS=1 python bench/term_gradients.py                       # default settings, one corpus clip
    python bench/term_gradients.py --speaker vctk_p226 --seconds 4 --shaping none

For one window of a corpus clip (embedded models), the weighted gradient of each enabled term with respect to the
waveform is taken at delta = 0 (before the first step) and at the delta of the last iteration (same pool draw):
its L2 norm, its share of the summed norms, and the fraction of samples where its sign equals the sign of the total
gradient (the sign step's direction; 0.5 = chance, i.e. the term does not steer the step). A term whose norm is
orders of magnitude under the others, or whose agreement stays at 0.5, contributes nothing to the cloak. Writes
bench/results/term_gradients.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from cloak.bundle import load_models
from cloak.config import ProtectConfig
from cloak.corpus import list_speakers
from cloak.protect import ENGINE_VERSION, ProtectionJob, objective, pgd_step

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
OUT = ROOT / "bench" / "results" / "term_gradients.json"


def term_gradients(job: ProtectionJob, delta: torch.Tensor) -> dict[str, dict[str, float]]:
    """Weighted per-term gradients at `delta` on the window's first pool draw."""
    attack = job.prepare()
    d = delta[None].clone().requires_grad_(True)
    losses = objective([attack], d, [job.first_idx])[0]
    grads = {k: torch.autograd.grad(attack.weights[k] * v, d, retain_graph=True)[0][0] for k, v in losses.items()}
    total = torch.stack(list(grads.values())).sum(0).sign()
    norms = {k: float(g.norm()) for k, g in grads.items()}
    norm_sum = sum(norms.values()) or 1.0
    return {k: {"loss": float(losses[k].detach()), "weight": attack.weights[k], "grad_norm": norms[k],
                "norm_share": norms[k] / norm_sum, "sign_agreement": float((g.sign() == total).float().mean())}
            for k, g in grads.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speaker", default="librispeech_1998", help="corpus speaker (default: not a validation one)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--shaping", choices=["masking", "none"], default="masking")
    p.add_argument("--iterations", type=int, default=ProtectConfig().iterations)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    spk = {s.name: s for s in list_speakers(CORPUS)}[a.speaker]
    x, sr = sf.read(str(spk.files[0]), dtype="float32", always_2d=True)
    x = x.mean(1)[: int(a.seconds * sr)]
    models = load_models()
    cfg = ProtectConfig(shaping=a.shaping, iterations=a.iterations)
    job = ProtectionJob(x, sr, models, cfg)
    t0 = time.perf_counter()
    attack = job.prepare()
    start = term_gradients(job, torch.zeros_like(attack.x[0]))
    while job.iteration < cfg.iterations - 1:
        pgd_step([job])
    end = term_gradients(job, job.delta)
    record: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or
        platform.machine(), "engine": ENGINE_VERSION, "model": models.diffvc_id, "precision": models.precision,
        "clip": str(spk.files[0].name), "seconds": a.seconds, "config": cfg.to_dict(),
        "start": start, "end": end, "wall_seconds": time.perf_counter() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))
    print(f"{spk.files[0].name}, {a.seconds:g} s, shaping {a.shaping}, {models.diffvc_id}, {models.precision}")
    print(f"{'term':6} {'when':5} {'loss':>9} {'weight':>6} {'|grad|':>10} {'share':>6} {'sign agree':>10}")
    for when, rows in (("start", start), ("end", end)):
        for k, r in rows.items():
            print(f"{k:6} {when:5} {r['loss']:9.4g} {r['weight']:6g} {r['grad_norm']:10.3g} {r['norm_share']:6.1%} "
                  f"{r['sign_agreement']:10.3f}")
    print(f"wrote {a.out} ({np.round(record['wall_seconds'])} s)")


if __name__ == "__main__":
    main()
