"""`cloak evaluate`: measure the protection on a directory of speakers, as the paper does.

Wiring (clients/cli/__init__.py): `Subcommand("evaluate", register_evaluate, run_evaluate, evaluate_available)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from clients.cli import (
    EXIT_CODES_HELP,
    EXIT_OK,
    CancelToken,
    HelpFormatter,
    UsageError,
    add_common_model_args,
    cancel_on_sigint,
    load_models_for,
    make_protector,
    resolve_settings,
)
from cloak import BundleError
from cloak.config import PRESETS
from cloak.files import jsonable

EVAL_MODULES = ("onnxruntime", "pesq", "pystoi", "lameenc", "noisereduce", "librosa", "matplotlib")

EVALUATE_EPILOG = f"""\
examples:
  cloak evaluate --speakers ../shared/corpus --out eval/            the full protocol (slow on CPU)
  cloak evaluate --speakers ../shared/corpus --out eval-q/ --quick  CI-sized: 2 speakers, 1 utterance, few steps
  cloak evaluate --speakers voices/ --models ~/diffvc-official --device cuda --out eval-official/
  cloak evaluate --speakers voices/ --losses id,ctx,score --out abl-no-sem/ --cache eval/cache
                                                   ablation (paper Table 3): clean clones reused from eval/

speakers: one sub-directory per speaker holding several utterances; sex from speakers.tsv
(folder<TAB>M|F) or SOURCES.md, used for gender-matched attacker sources and the cloak's target.

protocol: per speaker, its first --utterances files are protected; the attacker (the bundle's DiffVC) clones
--sources utterances of other same-sex speakers from the clean, the protected, and the transformed
(MP3 128/64/32, resample 16k, low-pass 4k, noise 30 dB, denoiser) references. Clones are scored by speaker
cosine against the enrollment (mean embedding of the speaker's other clean utterances) with GE2E (white-box)
and WavLM-SV when the bundle has it, thresholded at the EER calibrated on clean trials of the same set;
and by DNSMOS P.835/P.808. DSR = ASV rejects AND DNSMOS OVRL < --quality-threshold. The cloak itself is
measured by PESQ (wide-band), STOI, SNR and MCD. 95 % bootstrap CIs everywhere.

outputs in OUT: report.json (every number, settings, checksums, versions), report.md (tables),
scores.png, dsr.png, dnsmos.png, delta_spectrogram.png. Per-file results are cached (OUT/cache, or --cache)
as they are computed: rerun the same command to resume a stopped run.

{EXIT_CODES_HELP}
"""


def evaluate_available() -> bool:
    """Whether the `eval` extra is installed (the subcommand is hidden otherwise)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in EVAL_MODULES)
    except (ImportError, ValueError):
        return False


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _positive_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from e
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def register_evaluate(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="measure the protection (clone similarity, naturalness, audibility, robustness)",
        description="Protect utterances of each speaker in a directory, clone them with the attacker's DiffVC from "
                    "clean, protected and transformed references, and report ASV acceptance, DNSMOS, DSR, PESQ, "
                    "STOI, SNR, MCD with 95 %% bootstrap confidence intervals.",
        epilog=EVALUATE_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--speakers", required=True, metavar="DIR", help="directory with one sub-directory per speaker")
    p.add_argument("--out", default="evaluation", metavar="REPORT_DIR",
                   help="where report.json, report.md and the plots go (default ./evaluation)")
    p.add_argument("--cache", metavar="DIR", help="per-file result cache (default REPORT_DIR/cache); share one "
                                                  "between runs to reuse clean clones (ablations)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run: 2 speakers, 1 utterance, 3 s clips, 2 PGD iterations x 1 repeat, 3 sampler "
                        "steps (explicit flags still win)")
    add_common_model_args(p)
    p.add_argument("--attacker-models", metavar="DIR",
                   help="transfer: clone with this model bundle's DiffVC (one the cloak never saw) while the cloak is "
                        "computed on --models; default: the same model (white-box)")
    g = p.add_argument_group("protocol")
    g.add_argument("--utterances", type=_positive_int, metavar="N", help="protected utterances per speaker (default 3)")
    g.add_argument("--sources", type=_positive_int, metavar="N",
                   help="attacker sources per protected utterance, from same-sex speakers (default 1)")
    g.add_argument("--max-speakers", type=_positive_int, metavar="N", help="evaluate at most N speakers (default all)")
    g.add_argument("--max-seconds", type=_positive_float, metavar="S",
                   help="references and sources are trimmed to S seconds (default 8)")
    g.add_argument("--steps", type=_positive_int, metavar="N",
                   help="attacker's reverse-diffusion steps (default 100, the paper's)")
    g.add_argument("--mode", choices=["ml", "em", "pf"], default="ml", help="attacker's sampler (default ml)")
    g.add_argument("--transforms", metavar="LIST",
                   help="robustness transforms, comma-separated, or 'none' (default all: mp3_128,mp3_64,mp3_32,"
                        "resample_16k,lowpass_4k,noise_30db,denoise)")
    g.add_argument("--no-baselines", action="store_true",
                   help="skip the clean-reference + transform baselines of the robustness table")
    g.add_argument("--quality-threshold", type=_positive_float, metavar="Q",
                   help="DNSMOS OVRL below which a clone counts as degraded (default 2.5; see report.md)")
    g.add_argument("--bootstrap", type=_positive_int, metavar="N", help="bootstrap resamples (default 2000)")
    c = p.add_argument_group("protection settings (override the config file; defaults as for cloak protect)")
    c.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="named settings under the config file and these flags (paper = the paper's engine)")
    c.add_argument("--losses", dest="losses", metavar="LIST",
                   help="loss terms, comma-separated subset of id,ctx,score,sem,voice (default all; ablations as in "
                        "paper Table 3)")
    c.add_argument("--iterations", dest="iterations", type=int, metavar="N", help="PGD iterations (default 50)")
    c.add_argument("--repeats", dest="repeats", type=int, metavar="N", help="gradient repeats (default 5)")
    c.add_argument("--epsilon", dest="epsilon", type=float, metavar="EPS", help="l-inf bound (default 0.002)")
    c.add_argument("--seed", dest="seed", type=int, metavar="N",
                   help="seed of the cloak, the attacker and source selection (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    o.add_argument("--no-audio", action="store_true", help="keep no clone audio in the cache (numbers only)")
    o.add_argument("--json", action="store_true", help="print the headline numbers as one JSON object on stdout")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    o.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads for torch and onnxruntime")
    return p


def build_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(EvalSettings, cli Settings) from the parsed flags; UsageError / ConfigError for bad values."""
    from cloak.evaluate import QUICK, QUICK_PROTECT, EvalSettings
    from cloak.evaluate.transforms import TRANSFORMS

    speakers = Path(args.speakers).expanduser()
    if not speakers.is_dir():
        raise UsageError(f"--speakers {args.speakers}: not a directory")
    settings = resolve_settings(args)
    cfg = settings.config
    if args.quick:
        quick_cfg = {k: v for k, v in QUICK_PROTECT.items() if k not in settings.sources}
        cfg = cfg.with_(**quick_cfg)
    defaults: dict[str, Any] = dict(QUICK) if args.quick else {}
    transforms: tuple[str, ...] | None = None
    if args.transforms is not None:
        names = [t.strip() for t in args.transforms.split(",") if t.strip()]
        if names == ["none"]:
            transforms = ()
        else:
            unknown = [n for n in names if n not in TRANSFORMS]
            if unknown or not names:
                raise UsageError(f"--transforms: unknown {unknown or args.transforms!r}; known: "
                                 f"{', '.join(TRANSFORMS)}, or none")
            transforms = tuple(names)
    flags = {"utterances": args.utterances, "sources": args.sources, "max_speakers": args.max_speakers,
             "max_seconds": args.max_seconds, "steps": args.steps, "quality_threshold": args.quality_threshold,
             "bootstrap": args.bootstrap}
    values = {**defaults, **{k: v for k, v in flags.items() if v is not None}}
    ev = EvalSettings(speakers_dir=speakers, out_dir=Path(args.out).expanduser(), config=cfg,
                      cache_dir=None if args.cache is None else Path(args.cache).expanduser(),
                      models_dir=settings.models, device=settings.device, mode=args.mode, seed=cfg.seed,
                      transforms=transforms, transform_baselines=not args.no_baselines, plots=not args.no_plots,
                      quick=args.quick, save_audio=not args.no_audio, **values)
    return ev, settings


def run_evaluate(args: argparse.Namespace) -> int:
    from cloak.evaluate import evaluate

    ev_settings, settings = build_settings(args)
    attacker_dir = None
    if args.attacker_models is not None:
        attacker_dir = Path(args.attacker_models).expanduser()
        if not attacker_dir.is_dir():
            raise UsageError(f"--attacker-models: {attacker_dir} is not a directory")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    token = CancelToken()
    with cancel_on_sigint(token):
        # local protection only: the run scores white-box with the cloak's own models and keys its cache by their
        # checksums, so the protector is always make_protector's local one (no --server)
        protector = make_protector(settings, None, say=None if args.quiet else _say)
        attacker = None if attacker_dir is None else \
            load_models_for(dataclasses.replace(settings, models=str(attacker_dir)))
        try:
            report = evaluate(ev_settings, protector.models, cancel=token, progress=not args.quiet,
                              log=(lambda m: None) if args.quiet else None, attacker=attacker,
                              protect=protector.protect)
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, BundleError):
                raise
            raise UsageError(str(e)) from e
    out = ev_settings.out_dir
    if args.json:
        print(json.dumps({"report": str(out / "report.json"), "markdown": str(out / "report.md"),
                          "headline": report["headline"], "cache": report["cache"]}, default=jsonable), flush=True)
    else:
        print(summary_lines(report, out))
    return EXIT_OK


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary_lines(report: dict[str, Any], out: Path) -> str:
    h = report["headline"]
    rows = h["rows"]

    def pct(node: Any) -> str:
        return "—" if not node or node.get("mean") is None else f"{100 * node['mean']:.1f} %"

    def num(node: Any, fmt: str = ".2f") -> str:
        return "—" if not node or node.get("mean") is None else format(node["mean"], fmt)

    thr = "—" if h["threshold"] is None else f"{h['threshold']:.3f}"
    lines = [f"ASV {h['asv']} (threshold {thr}):  accept undefended {pct(rows['clean']['asv_accept'])}, "
             f"protected {pct(rows['protected']['asv_accept'])}",
             f"DNSMOS OVRL of clones:  undefended {num(rows['clean']['dnsmos_ovrl'])}, "
             f"protected {num(rows['protected']['dnsmos_ovrl'])}",
             f"DSR:  protected {pct(rows['protected']['dsr'])} (criterion on undefended clones: "
             f"{pct(rows['clean']['dsr'])})",
             f"cloak:  PESQ {num(rows['protected']['pesq'])}, STOI {num(rows['protected']['stoi'], '.3f')}, "
             f"SNR {num(rows['protected']['snr_db'], '.1f')} dB, MCD {num(rows['protected']['mcd_db'])} dB",
             f"report: {out / 'report.md'}  ({out / 'report.json'})"]
    return "\n".join(lines)


__all__ = ["register_evaluate", "run_evaluate", "evaluate_available", "build_settings", "EVALUATE_EPILOG"]
