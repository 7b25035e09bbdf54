"""`cloak sample`: copy the speech sample shipped with VoiceCloak out, or print where it is."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cloak.audio import output_problem
from cloak.sample import SAMPLE_CREDIT, sample_path

from .common import EXIT_CODES_HELP, EXIT_OK, HelpFormatter, UsageError


def register_sample(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample", help="copy the shipped speech sample out (to try cloak protect on)",
        description="Copy the short speech sample shipped with VoiceCloak (5.6 s of LibriSpeech, CC BY 4.0) to "
                    "PATH, or print where it is. `cloak protect --sample` protects it directly.",
        epilog="examples:\n  cloak sample take.flac            a copy to try `cloak protect take.flac` on\n"
               "  cloak sample --path               where the installed sample is\n\n" + EXIT_CODES_HELP,
        formatter_class=HelpFormatter)
    p.add_argument("dest", nargs="?", metavar="PATH", help="where to copy it (default ./sample.flac)")
    p.add_argument("--path", action="store_true", help="print the installed sample's path instead of copying it")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing file")
    return p


def run_sample(args: argparse.Namespace) -> int:
    import shutil

    src = sample_path()
    if args.path:
        print(src)
        return EXIT_OK
    dest = Path(args.dest or "sample.flac").expanduser()
    if dest.is_dir():
        dest = dest / "sample.flac"
    if dest.suffix.lower() != src.suffix:
        raise UsageError(f"{dest}: the sample is FLAC: give a .flac path (cloak protect converts with -o x.wav)")
    if dest.exists() and not args.force:
        raise UsageError(f"{dest}: already exists (use --force to replace it)")
    why = output_problem(dest)
    if why is not None:
        raise UsageError(f"cannot write {dest}: {why}")
    shutil.copyfile(src, dest)
    print(f"{dest}  ({SAMPLE_CREDIT})")
    return EXIT_OK
