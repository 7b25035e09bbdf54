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
  cloak train-mini --stage pack --pack runs/pack.pt  compact data (~30 MB) for a GPU machine without the corpora
  cloak train-mini --items runs/pack.pt --cache runs/gpu --device cuda --init cloak/data/cloak-mini.pt
      --dec-batch 64 --dec-frames 128 --hours 0.15  (one command) the recipe at GPU batch sizes, bf16 autocast

Stages: prepare (resample + cache mels and GE2E d-vectors), pack, encoder, means, decoder, export.
Each stage resumes from its last checkpoint in --cache; a stopped run continues where it was.
"""


def register_train_mini(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-mini", help="train the embedded cloak-mini DiffVC on the project corpora",
                              description="Train DiffVC's architecture at reduced width (cloak-mini) on open speech.",
                              epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["../shared/corpus-train", "../shared/corpus"],
                   help="speaker directories (one sub-directory per speaker)")
    p.add_argument("--cache", default="runs/mini", help="cache and checkpoint directory")
    p.add_argument("--stage", choices=["prepare", "pack", "encoder", "means", "decoder", "export", "all"],
                   default="all")
    p.add_argument("--hours", type=float, default=6.0, help="wall-time budget of this run")
    p.add_argument("--out", default="runs/mini/cloak-mini.pt", help="exported checkpoint")
    p.add_argument("--dec-steps", type=int, default=None, help="decoder steps in total")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--init", default=None, help="continue from an exported checkpoint (fresh machine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the means and the decoder (default cpu)")
    p.add_argument("--dec-batch", type=int, default=None, help="decoder batch size (default 8)")
    p.add_argument("--dec-frames", type=int, default=None, help="decoder crop length in frames (default 64)")
    p.add_argument("--dec-lr", type=float, default=None, help="decoder learning rate (default 2e-4)")
    p.add_argument("--pack", default=None, help="with --stage pack: where to write the compact data file")
    p.add_argument("--items", default=None, help="train from a pack file instead of the corpora")
    return p


def run_train_mini(args: argparse.Namespace) -> int:
    from cloak.train.mini import main as train_main

    argv = ["--data", *args.data, "--cache", args.cache, "--stage", args.stage, "--hours", str(args.hours),
            "--out", args.out, "--threads", str(args.threads)]
    if args.dec_steps is not None:
        argv += ["--dec-steps", str(args.dec_steps)]
    for flag in ("init", "device", "dec_batch", "dec_frames", "dec_lr", "pack", "items"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    train_main(argv)
    return 0
