"""Audibility and effect of the cloak on every corpus speaker at two recording levels.

    OMP_NUM_THREADS=1 python bench/audibility.py                        # default vs paper settings, resumable
    python bench/audibility.py --configs default --speakers vctk_p225   # a subset
    python bench/audibility.py --report                                 # rewrite the markdown from the JSON

One clip per speaker of `shared/corpus` (its first file, at most `--seconds` long), as a user hands it in:
resampled to 44.1 kHz, duplicated to stereo, scaled to an ITU-T P.56 active speech level of -26 and -16 dBFS
(cloak.perceptual.active_speech_level). Each clip is protected in-process on the embedded models with a named
configuration, then measured against its clean version: SNR (whole clip), PESQ-WB (P.862.2 at 16 kHz), STOI,
the GE2E cosine between clean and protected recording (the speaker embedding DiffVC conditions on; the drop
1 - cosine is the cloak's direct effect on it) and the loss values the engine reached.

Configurations: `default` (ProtectConfig(), masking shaping on), `paper` (shaping="none": the paper's plain
l-infinity box, the engine's default until the shaping came), `margin<dB>` (the shaping with another margin, e.g.
margin16), `gamma<g>m<dB>` (another exponent and margin, e.g. gamma0.25m28) and `quality<PESQ-WB>` (a quality
target: each window's exponent chosen by cloak.quality, e.g. quality3.9); a `voice-` prefix runs any of them
with `--losses voice` only, to screen a shaping fast. Results are checkpointed into the JSON after every clip (a
killed run resumes); the markdown table is written from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
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
from cloak.evaluate.metrics import GE2EEncoder, cosine, pesq_wb, snr_db, stoi, to_rate
from cloak.perceptual import active_speech_level, scale_to_level
from cloak.protect import ENGINE_VERSION, protect

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
RESULTS = ROOT / "bench" / "results"
RATE = 44_100
LEVELS = (-26.0, -16.0)
PESQ_GOAL = 3.5
SNR_GOAL = 33.0


def config_named(name: str, iterations: int | None = None) -> ProtectConfig:
    """The named configuration (see the module docstring); `iterations` overrides for quick looks."""
    if name.startswith("voice-"):  # screening the shaping on the one term that carries the effect (5x faster;
        # PESQ depends on the bound, not on the loss set: see bench/results/operating_points.md)
        return config_named(name.removeprefix("voice-"), iterations).with_(losses=("voice",))
    if name == "default":
        cfg = ProtectConfig()
    elif name == "paper":
        cfg = ProtectConfig(shaping="none")
    elif name.startswith("gamma"):  # exploration: gamma<g>m<margin>
        g, m = name.removeprefix("gamma").split("m")
        cfg = ProtectConfig(masking_exponent=float(g), masking_margin_db=float(m))
    elif name.startswith("quality"):  # a quality target: the exponent chosen per window (cloak.quality)
        cfg = ProtectConfig(quality_target=float(name.removeprefix("quality")))
    elif name.startswith("margin"):
        cfg = ProtectConfig(masking_margin_db=float(name.removeprefix("margin")))
    else:
        raise SystemExit(f"unknown configuration {name!r}: [voice-](default, paper, margin<dB>, gamma<g>m<dB> or "
                         "quality<PESQ-WB>)")
    if iterations is None:
        return cfg
    # fewer iterations with a proportionally larger step, so that PGD can still cross the box
    return cfg.with_(iterations=iterations, step_size=min(cfg.epsilon, cfg.step_size * cfg.iterations / iterations))


def speaker_clip(speaker: str, seconds: float) -> tuple[np.ndarray, str]:
    """The speaker's first corpus file (at most `seconds`), as 44.1 kHz stereo float32."""
    path = sorted((CORPUS / speaker).iterdir())[0]
    x, sr = sf.read(str(path), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    x = to_rate(x[: int(seconds * sr)], sr, RATE)
    return np.stack([x, x], axis=1), path.name


def measure(clean: np.ndarray, protected: np.ndarray, encoder: GE2EEncoder) -> dict[str, float | None]:
    """Quality and GE2E effect of one protected stereo clip (both channels carry the same delta)."""
    ref, out = clean[:, 0], protected[:, 0]
    e_clean = encoder.embed(to_rate(ref, RATE, 16_000))
    e_prot = encoder.embed(to_rate(out, RATE, 16_000))
    return {
        "snr_db": snr_db(ref, out),
        "pesq_wb": pesq_wb(ref, out, RATE),
        "stoi": stoi(ref, out, RATE),
        "ge2e_cos": cosine(e_clean, e_prot),
        "ge2e_drop": 1.0 - cosine(e_clean, e_prot),
        "linf": float(np.max(np.abs(out.astype(np.float64) - ref))),
    }


def key(config: str, speaker: str, level: float) -> str:
    return f"{config}|{speaker}|{level:g}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if data.get("rows") and data.get("engine_version") != ENGINE_VERSION:
        raise SystemExit(f"{out} holds rows of engine {data.get('engine_version')!r}, not {ENGINE_VERSION!r}: "
                         "resuming would mix engines; give another --out")
    data.setdefault("rows", {})
    data.update({
        "what": "cloak audibility and GE2E effect per corpus speaker and active speech level "
                "(44.1 kHz stereo, one clip per speaker)",
        "engine_version": ENGINE_VERSION,
        "machine": {"cpu": cpu_name(), "cores": __import__("os").cpu_count(), "threads": torch.get_num_threads()},
        "seconds_max": args.seconds,
    })
    speakers = args.speakers or sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
    models = load_models(precision=args.precision)
    data["precision"] = models.precision
    encoder = GE2EEncoder(models.ge2e, models.device)
    for name in args.configs:
        cfg = config_named(name, args.iterations)
        data.setdefault("configs", {})[name] = cfg.to_dict()
        for speaker in speakers:
            stereo, fname = speaker_clip(speaker, args.seconds)
            for level in args.levels:
                k = key(name, speaker, level)
                if k in data["rows"] and not args.force:
                    continue
                clean = scale_to_level(stereo, RATE, level)
                t0 = time.perf_counter()
                res = protect(clean, RATE, models=models, config=cfg)
                row: dict[str, Any] = {
                    "config": name, "speaker": speaker, "file": fname, "level_dbfs": level,
                    "measured_level_dbfs": active_speech_level(clean[:, 0], RATE)[0],
                    "seconds": clean.shape[0] / RATE, "wall_s": time.perf_counter() - t0,
                    **measure(clean, res.audio, encoder),
                    "losses_start": res.metrics["losses_start"], "losses_end": res.metrics["losses_end"],
                    "gender": res.metrics["gender"], "model": res.metrics["model"],
                    "masking_exponents": res.metrics["masking_exponents"],
                    "predicted_pesq": res.metrics["predicted_pesq"],
                }
                data["rows"][k] = row
                data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
                out.write_text(json.dumps(data, indent=1) + "\n")
                print(f"{name:10s} {speaker:17s} {level:5.0f} dBFS  SNR {row['snr_db']:5.1f}  "
                      f"PESQ {row['pesq_wb'] or float('nan'):.2f}  STOI {row['stoi']:.3f}  "
                      f"GE2E drop {row['ge2e_drop']:.4f}  {row['wall_s']:.0f} s", flush=True)
    return data


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(data: dict[str, Any], md_path: Path) -> str:
    rows = list(data["rows"].values())
    configs = [c for c in ("default", "paper") if any(r["config"] == c for r in rows)]
    configs += sorted({r["config"] for r in rows} - set(configs))
    lines = [f"# Cloak audibility per speaker and recording level ({data.get('updated', '')})", "",
             f"Engine {data['engine_version']}, embedded models ({data.get('precision')}), one clip per speaker "
             f"of the corpus (first file, at most {data['seconds_max']:g} s), 44.1 kHz stereo, scaled to the "
             "stated ITU-T P.56 active speech level. Goal: PESQ-WB >= 3.5 and SNR >= 33 dB. GE2E drop = "
             "1 - cosine(clean, protected) of the speaker embedding DiffVC conditions on (the cloak's effect); "
             "`loss gain` = rise of the engine's weighted objective from the clean recording to the protected one "
             "(higher = stronger).", ""] + ([data["note"], ""] if data.get("note") else [])
    for c in configs:
        cr = [r for r in rows if r["config"] == c]
        cfg = data["configs"][c]
        adaptive = cfg["shaping"] == "masking" and cfg.get("masking_exponent", 1.0) is None
        exponent = (f"exponent per window for predicted PESQ-WB >= {cfg['quality_target']:g}" if adaptive
                    else f"exponent {cfg.get('masking_exponent', 1.0):g}")
        shaping = (f"shaping=masking, margin {cfg['masking_margin_db']:g} dB, {exponent}"
                   if cfg["shaping"] == "masking" else "shaping=none")
        lines += [f"## {c}: {shaping}, epsilon {cfg['epsilon']:g}, {cfg['iterations']} iterations", "",
                  "| speaker | level (dBFS) | s | SNR (dB) | PESQ-WB | STOI | GE2E drop | loss gain | goal |"
                  + (" exponent (predicted PESQ-WB) |" if adaptive else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if adaptive else "")]
        for r in sorted(cr, key=lambda r: (r["speaker"], r["level_dbfs"])):
            w = ProtectConfig.from_dict(cfg).loss_weights  # 4 weights in results written before L_voice
            loss = sum(w[k] * (v - r["losses_start"][k]) for k, v in r["losses_end"].items())
            ok = (r["pesq_wb"] or 0) >= PESQ_GOAL and r["snr_db"] >= SNR_GOAL
            lines.append(f"| {r['speaker']} | {r['level_dbfs']:g} | {r['seconds']:.1f} | {r['snr_db']:.1f} | "
                         f"{_fmt(r['pesq_wb'], '.2f')} | {r['stoi']:.3f} | {r['ge2e_drop']:.4f} | {loss:.3f} | "
                         f"{'met' if ok else 'NOT met'} |"
                         + (" " + ", ".join(f"{g:g} ({p:.2f})" for g, p in
                                            zip(r["masking_exponents"], r["predicted_pesq"], strict=True)) + " |"
                            if adaptive else ""))
        lines.append("")
        for level in sorted({r["level_dbfs"] for r in cr}):
            lr = [r for r in cr if r["level_dbfs"] == level]
            pesq = [r["pesq_wb"] for r in lr if r["pesq_wb"] is not None]
            lines.append(f"- {level:g} dBFS, {len(lr)} speakers: SNR min {min(r['snr_db'] for r in lr):.1f} / mean "
                         f"{np.mean([r['snr_db'] for r in lr]):.1f} dB, PESQ-WB min {min(pesq):.2f} / mean "
                         f"{np.mean(pesq):.2f}, STOI min {min(r['stoi'] for r in lr):.3f}, GE2E drop mean "
                         f"{np.mean([r['ge2e_drop'] for r in lr]):.4f}, goal met by "
                         f"{sum((r['pesq_wb'] or 0) >= PESQ_GOAL and r['snr_db'] >= SNR_GOAL for r in lr)}"
                         f"/{len(lr)}")
        lines.append("")
    if "default" in configs and "paper" in configs:
        lines += ["## Effect kept by the default vs the paper's box (same clips)", ""]
        for level in sorted({r["level_dbfs"] for r in rows}):
            pairs = [(data["rows"].get(key("default", r["speaker"], level)), r) for r in rows
                     if r["config"] == "paper" and r["level_dbfs"] == level]
            pairs = [(d, p) for d, p in pairs if d is not None and d.get("model") == p.get("model")]
            if pairs:
                kept = np.mean([d["ge2e_drop"] for d, _ in pairs]) / max(np.mean([p["ge2e_drop"] for _, p in pairs]),
                                                                          1e-12)
                lines.append(f"- {level:g} dBFS: mean GE2E drop {np.mean([d['ge2e_drop'] for d, _ in pairs]):.4f} "
                             f"(default) vs {np.mean([p['ge2e_drop'] for _, p in pairs]):.4f} (paper): "
                             f"{100 * kept:.0f} % kept, over {len(pairs)} speakers")
        lines.append("")
    text = "\n".join(lines)
    md_path.write_text(text)
    return text


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result file from several (same engine version; rows and configurations united, newest last)."""
    versions = {p["engine_version"] for p in parts}
    if len(versions) != 1:
        raise SystemExit(f"results of different engine versions cannot be merged: {sorted(versions)}")
    out: dict[str, Any] = {**parts[0], "rows": {}, "configs": {}}
    def effective(cfg: dict[str, Any]) -> dict[str, Any]:  # the shaping's parameters do nothing without it
        return {k: v for k, v in cfg.items() if cfg["shaping"] != "none" or not k.startswith("masking_")}

    for p in parts:
        for name, cfg in p.get("configs", {}).items():
            if effective(out["configs"].setdefault(name, cfg)) != effective(cfg):
                raise SystemExit(f"configuration {name!r} differs between the files")
        out["rows"].update(p["rows"])
        out["updated"] = max(out.get("updated", ""), p.get("updated", ""))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["default", "paper"])
    p.add_argument("--speakers", nargs="+")
    p.add_argument("--levels", nargs="+", type=float, default=list(LEVELS))
    p.add_argument("--seconds", type=float, default=7.0, help="clip length cap (default 7)")
    p.add_argument("--iterations", type=int, help="override the configurations' iterations (exploration only)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "audibility.json"))
    p.add_argument("--md", help="markdown path (default: the JSON's with .md)")
    p.add_argument("--force", action="store_true", help="re-run clips already in the JSON")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge the rows of these result files (e.g. of runs split by speaker over several "
                        "processes) into --out, then write the markdown")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
    if args.merge:
        data = merge([json.loads(Path(f).read_text()) for f in args.merge])
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    else:
        data = json.loads(Path(args.out).read_text()) if args.report else run(args)
    print(report(data, md))


if __name__ == "__main__":
    main()
