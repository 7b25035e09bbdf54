"""`cloak train-mini`: (re)train the embedded cloak-mini DiffVC; a thin wrapper over cloak.train.mini."""

from __future__ import annotations

import argparse
from typing import Any

TRAIN_EPILOG = """\
examples:
  cloak train-mini                                   all stages, resumable, 6 h wall-time budget
  cloak train-mini --hours 1 --cache runs/mini       one more hour on the same run
  cloak train-mini --stage export --out cloak/data/cloak-mini.pt
  cloak train-mini --init cloak/data/cloak-mini.pt   continue the shipped model on a fresh machine

Stages: prepare (resample + cache mels and GE2E d-vectors), encoder, means, decoder, export.
Each stage resumes from its last checkpoint in --cache; a stopped run continues where it was.
"""


def register_train_mini(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-mini", help="train the embedded cloak-mini DiffVC on the project corpora",
                              description="Train DiffVC's architecture at reduced width (cloak-mini) on open speech.",
                              epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["../shared/corpus-train", "../shared/corpus"],
                   help="speaker directories (one sub-directory per speaker)")
    p.add_argument("--cache", default="runs/mini", help="cache and checkpoint directory")
    p.add_argument("--stage", choices=["prepare", "encoder", "means", "decoder", "export", "all"], default="all")
    p.add_argument("--hours", type=float, default=6.0, help="wall-time budget of this run")
    p.add_argument("--out", default="runs/mini/cloak-mini.pt", help="exported checkpoint")
    p.add_argument("--dec-steps", type=int, default=None, help="decoder steps in total")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--init", default=None, help="continue from an exported checkpoint (fresh machine)")
    return p


def run_train_mini(args: argparse.Namespace) -> int:
    from cloak.train.mini import main as train_main

    argv = ["--data", *args.data, "--cache", args.cache, "--stage", args.stage, "--hours", str(args.hours),
            "--out", args.out, "--threads", str(args.threads)]
    if args.dec_steps is not None:
        argv += ["--dec-steps", str(args.dec_steps)]
    if args.init:
        argv += ["--init", args.init]
    train_main(argv)
    return 0
