"""`cloak clone`: clone a voice with DiffVC, the attack VoiceCloak defends against (to test a protection)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from cloak import CancelToken

from .common import EXIT_CODES_HELP, EXIT_OK, EXIT_USAGE, HelpFormatter, json_line
from .progress import cancel_on_sigint
from .settings import add_common_model_args, load_models_for, resolve_settings

CLONE_EPILOG = f"""\
examples:
  cloak clone --source src.wav --reference voice.wav -o out.wav       convert src.wav to the voice of voice.wav
  cloak clone --source src.wav --reference voice.cloaked.wav -o c.wav  check that a cloaked reference resists
  cloak clone a.wav b.wav --reference voice.wav -o clones/ --json      several sources into a directory
  cloak clone --source src.wav --reference voice.wav --steps 100 --mode em --seed 3 --no-postfilter

Outputs are float32 WAV at 22.05 kHz (DiffVC + HiFi-GAN V1; needs the vocoder from `pip install 'voicecloak[eval]'`).

{EXIT_CODES_HELP}
"""


def clone_available() -> bool:
    try:
        return importlib.util.find_spec("cloak.clone") is not None
    except (ImportError, ValueError):
        return False


def register_clone(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("clone", help="clone a voice with DiffVC (to test a protection)",
                              description="Convert SOURCE recordings to the voice of a REFERENCE recording with "
                                          "DiffVC, the attack VoiceCloak defends against.",
                              epilog=CLONE_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="what to say (audio files)")
    p.add_argument("--source", action="append", default=[], metavar="SRC", help="a source file (repeatable)")
    p.add_argument("--reference", required=True, metavar="REF", help="whose voice (audio file, cloaked or not)")
    p.add_argument("-o", "--output", metavar="OUT|DIR", help="output file (one source) or directory")
    p.add_argument("--steps", type=int, default=30, metavar="N", help="reverse diffusion steps (default 30)")
    p.add_argument("--mode", choices=["ml", "em", "pf"], default="ml", help="sampler (default ml, DiffVC's)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument("--no-postfilter", action="store_true", help="skip the mel spectral-subtraction post-filter")
    p.add_argument("-f", "--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="one JSON object per output on stdout")
    add_common_model_args(p)
    return p


def run_clone(args: argparse.Namespace) -> int:
    from cloak.clone import clone_files

    sources = [Path(s) for s in [*args.sources, *args.source]]
    if not sources:
        print("cloak clone: give at least one source (--source SRC or positional)", file=sys.stderr)
        return EXIT_USAGE
    if len(sources) > 1 and args.output is not None and Path(args.output).suffix:
        print("cloak clone: several sources need an output directory (-o DIR), not a file", file=sys.stderr)
        return EXIT_USAGE
    settings = resolve_settings(args, protect_fields=False)
    token = CancelToken()
    with cancel_on_sigint(token):
        models = load_models_for(settings)
        results = clone_files(sources, Path(args.reference), None if args.output is None else Path(args.output),
                              models=models, overwrite=args.force, steps=args.steps, mode=args.mode,
                              seed=args.seed, postfilter=not args.no_postfilter, cancel=token)
    for r in results:
        if args.json:
            json_line(r)
        else:
            print(r["output"])
    return EXIT_OK
