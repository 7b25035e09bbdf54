"""The PNG plots of a `cloak evaluate` report (cloak.evaluate.report): score distributions, DSR per condition,
DNSMOS of the clones, and the spectrogram of one perturbation next to its clean reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_plots(r: dict[str, Any], out_dir: Path, example: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: list[str] = []
    prim = r["protocol"]["asv_primary"]
    items = r["items"]
    conds = r["conditions"]

    # 1. score distributions, clean vs protected clones, with the calibration trials and the threshold
    fig, ax = plt.subplots(figsize=(7, 4))
    cal = r["calibration_scores"].get(prim, {})
    series = [("calibration: same speaker", cal.get("target", []), "tab:green", 0.25),
              ("calibration: other speaker", cal.get("nontarget", []), "tab:gray", 0.25),
              ("clones of clean references", [i["scores"].get(prim) for i in items if i["condition"] == "clean"],
               "tab:blue", 0.6),
              ("clones of protected references", [i["scores"].get(prim) for i in items
                                                   if i["condition"] == "protected"], "tab:red", 0.6)]
    allv = [v for _, vals, _, _ in series for v in vals if v is not None]
    bins = np.linspace(min(allv + [0.0]), max(allv + [1.0]), 40)
    for label, vals, color, alpha in series:
        vals = [v for v in vals if v is not None]
        if vals:
            ax.hist(vals, bins=bins, density=True, alpha=alpha, color=color, label=f"{label} (n={len(vals)})")
    thr = r["headline"]["threshold"]
    if thr is not None:
        ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3f}")
    ax.set_xlabel(f"{prim} cosine to the target's enrollment")
    ax.set_ylabel("density")
    ax.set_title("Speaker similarity of clones")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=110)
    plt.close(fig)
    written.append("scores.png")

    # 2. DSR per condition with CIs, protected vs clean baseline
    names = ["none"] + list(r["protocol"]["transforms"])
    prot = [conds.get("protected" if n == "none" else f"protected+{n}") for n in names]
    base = [conds.get("clean" if n == "none" else f"clean+{n}") for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(names) + 2), 4))
    xs = np.arange(len(names))
    for off, rows, color, label in ((-0.2, prot, "tab:red", "protected reference"),
                                    (0.2, base, "tab:blue", "clean reference (baseline)")):
        means, err_lo, err_hi = [], [], []
        for row in rows:
            d = row.get("dsr") if row else None
            m = d["mean"] if d and d.get("mean") is not None else 0.0
            lo, hi = (d["ci95"] if d and d.get("ci95", [None])[0] is not None else (m, m))
            means.append(100 * m)
            err_lo.append(100 * (m - lo))
            err_hi.append(100 * (hi - m))
        ax.bar(xs + off, means, width=0.4, color=color, alpha=0.8, label=label,
               yerr=[err_lo, err_hi], capsize=3)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_ylabel("DSR (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Defense success rate per condition (ASV {prim}, OVRL < {r['protocol']['quality_threshold']:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dsr.png", dpi=110)
    plt.close(fig)
    written.append("dsr.png")

    # 3. DNSMOS OVRL per condition
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(conds) + 2), 4))
    data = [[i["dnsmos"]["ovrl"] for i in items if i["condition"] == c] for c in conds]
    ax.boxplot(data, tick_labels=list(conds), showmeans=True)
    ax.axhline(r["protocol"]["quality_threshold"], color="k", ls="--", lw=1)
    ax.set_ylabel("DNSMOS OVRL of the clone")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "dnsmos.png", dpi=110)
    plt.close(fig)
    written.append("dnsmos.png")

    # 4. spectrogram of the perturbation delta next to the clean reference
    if example is not None:
        x, y, sr = example["clean"], example["protected"], example["sr"]
        delta = y.astype(np.float64) - x.astype(np.float64)
        fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        n_fft = 512 if sr <= 24_000 else 1024
        vmax = None
        for ax, sig, title in ((axes[0], x, "clean reference"), (axes[1], delta, "perturbation δ = protected − clean")):
            spec, freqs, t, im = ax.specgram(sig, NFFT=n_fft, Fs=sr, noverlap=n_fft * 3 // 4, cmap="magma",
                                             scale="dB", mode="psd", vmax=vmax)
            if vmax is None:
                vmax = float(10 * np.log10(np.max(spec) + 1e-20))
                im.set_clim(vmax - 100, vmax)
            else:
                im.set_clim(vmax - 100, vmax)
            ax.set_title(f"{title} ({example['key']})", fontsize=9)
            ax.set_ylabel("Hz")
            fig.colorbar(im, ax=ax, label="dB")
        axes[1].set_xlabel("s")
        fig.tight_layout()
        fig.savefig(out_dir / "delta_spectrogram.png", dpi=110)
        plt.close(fig)
        written.append("delta_spectrogram.png")
    return written
