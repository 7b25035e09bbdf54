"""How much a trained decoder uses its speaker conditioning: a cheap training diagnostic, no vocoder, no sampling.

For held-out crops (the `val_seen` utterances: seen speakers, unseen sentences) and times t in a few bands of the
late diffusion, where x_t no longer shows the target's timbre, the decoder's errors are measured twice with the same
noise: with the crop's own conditioning (d-vector and reference mel of the same utterance) and with another crop's
(`shuffled`). Two errors per band:
  eps       the training loss, mean (s*sqrt(var) + z)^2;
  spectrum  the squared error of the long-term (time-mean) spectrum of the x_0 the score implies, nats^2 per bin.
`gain` is (shuffled - right) / right. A decoder that ignores its conditioning has gain 0 and cannot clone; a perfect
one would lower the spectrum error by about the between-speaker variance of the long-term spectrum (~0.25 nats^2
per bin on the project's corpora) wherever x_t shows no timbre. At cloak-mini's step 7,000 the spectrum gain at
t in [0.7, 0.85) was 3 %.

    python -m cloak.train.probe --models DIR_OR_CHECKPOINT [--cache runs/mini] [--items PACK] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ..models.diffvc import DiffVC, load_diffvc
from .mini import STRONG_PERTURBATION, decoder_example, load_items

BANDS = ((0.5, 0.7), (0.7, 0.85))


def conditioning_use(model: DiffVC, items: list[dict], means: list[torch.Tensor], bands=BANDS, batches: int = 6,
                     batch: int = 16, frames: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """{band: {eps_right, eps_shuffled, eps_gain, spectrum_right, spectrum_shuffled, spectrum_gain}}."""
    pool = [(it, mu) for it, mu in zip(items, means, strict=True)
            if it["split"] == "val_seen" and it["mel"].shape[1] >= frames]
    if len({it["speaker"] for it, _ in pool}) < 2:
        raise ValueError("conditioning probe: needs val_seen utterances of at least two speakers")
    dec = model.decoder
    dev = next(dec.parameters()).device
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for lo, hi in bands:
        acc = dict.fromkeys(("eps_right", "eps_shuffled", "spectrum_right", "spectrum_shuffled"), 0.0)
        for _ in range(batches):
            picked = [pool[rng.randrange(len(pool))] for _ in range(batch)]
            examples = [decoder_example(it["mel"], mu, frames, rng, STRONG_PERTURBATION) for it, mu in picked]
            x, mu, ref, mref, mask = (torch.stack(v).to(dev) for v in zip(*examples, strict=True))
            c = torch.stack([it["dvec"].float() for it, _ in picked]).to(dev)
            # shuffled: each sample gets the conditioning of the next sample of another speaker
            spk = [it["speaker"] for it, _ in picked]
            perm = []
            for i in range(batch):
                others = [(i + k) % batch for k in range(1, batch) if spk[(i + k) % batch] != spk[i]]
                perm.append(others[0] if others else i)
            t = (lo + (hi - lo) * torch.rand(batch, generator=gen)).to(dev)
            w = (dec.variance(t) / dec.get_gamma(0, t) ** 2).flatten()
            seed_t = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))  # the same noise for every pass
            for name, (r_, mr_, c_) in (("right", (ref, mref, c)), ("shuffled", (ref[perm], mref[perm], c[perm]))):
                with torch.no_grad():
                    eps = dec.loss_t(x, mask, mu, r_, mr_, c_, t, generator=torch.Generator(dev).manual_seed(seed_t))
                    both_terms = dec.loss_t(x, mask, mu, r_, mr_, c_, t, spectrum_weight=w,
                                            generator=torch.Generator(dev).manual_seed(seed_t))
                acc[f"eps_{name}"] += float(eps) / batches
                acc[f"spectrum_{name}"] += float(both_terms - eps) / batches
        acc["eps_gain"] = (acc["eps_shuffled"] - acc["eps_right"]) / acc["eps_right"]
        acc["spectrum_gain"] = (acc["spectrum_shuffled"] - acc["spectrum_right"]) / acc["spectrum_right"]
        out[f"{lo:g}-{hi:g}"] = {k: round(v, 5) for k, v in acc.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="a bundle dir (its diffvc.pt) or a checkpoint file")
    p.add_argument("--cache", type=Path, default=Path("runs/mini"), help="training cache with data.pt and means.pt")
    p.add_argument("--items", type=Path, help="prepared data or a pack file (default: CACHE/data.pt)")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.models / "diffvc.pt" if a.models.is_dir() else a.models
    model = load_diffvc(str(path)).eval()
    items = load_items(a.items or a.cache / "data.pt")
    means = torch.load(a.cache / "means.pt", weights_only=False)["means"]
    res = conditioning_use(model, items, means, batches=a.batches)
    if a.json:
        print(json.dumps(res))
        return
    for band, r in res.items():
        print(f"t in [{band}): eps {r['eps_right']:.4f} vs shuffled {r['eps_shuffled']:.4f} "
              f"(gain {100 * r['eps_gain']:+.1f} %); spectrum {r['spectrum_right']:.3f} vs "
              f"{r['spectrum_shuffled']:.3f} nats^2 (gain {100 * r['spectrum_gain']:+.1f} %)")


if __name__ == "__main__":
    main()
