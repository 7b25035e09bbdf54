"""What every `cloak` subcommand shares: exit codes, environment variable names, usage errors and their one-line
messages, the help formatter and the argument parser."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from cloak.files import jsonable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_AUDIO = 3
EXIT_BUNDLE = 4
EXIT_SERVER = 5
EXIT_CANCELLED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    internal error (rerun with CLOAK_DEBUG=1 for a traceback)
  2    usage error or bad settings; nothing was processed
  3    an input is not usable audio or an output could not be written (other files still processed)
  4    model bundle problem (missing directory/checkpoint, corrupt file, SHA256SUMS mismatch)
  5    server unavailable (remote mode: unreachable, bad token, queue full, draining)
  130  cancelled with Ctrl-C (no partial output is left behind)"""

ENV_MODELS = "CLOAK_MODELS"
ENV_SERVER = "CLOAK_SERVER"
ENV_TOKEN_FILE = "CLOAK_TOKEN_FILE"
ENV_DEBUG = "CLOAK_DEBUG"


class UsageError(Exception):
    """Bad command line or settings: exit code 2."""


def print_error(msg: str) -> None:
    print(f"cloak: {msg}", file=sys.stderr, flush=True)


def debug_enabled() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


class CloakArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2): `cloak protect: error: argument --iterations: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def json_line(obj: dict[str, Any]) -> None:
    """One JSON object on one line of stdout (--json output)."""
    print(json.dumps(obj, default=jsonable), flush=True)
