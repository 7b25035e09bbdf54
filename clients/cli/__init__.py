"""`cloak`: the VoiceCloak command line.

    cloak protect IN... [-o OUT|DIR] [-r] [--force] [--json] [settings]   cloak recordings
    cloak protect --sample [-o OUT]                                       cloak the shipped speech sample
    cloak sample [PATH]                                                   copy the shipped sample out
    cloak models [list|verify]                                            show / check the model bundle
    cloak info                                                            versions, devices, paths
    cloak serve [--listen ADDR] [--models DIR] [--token-file F] ...       the gRPC protection server

Exit codes (the same for every subcommand):

    0    success
    1    internal error (a bug, or the machine ran out of memory); rerun with CLOAK_DEBUG=1 for a traceback
    2    usage error or bad settings (unknown flag, value out of range, bad config file, output exists
         without --force or cannot be written, several inputs with -o FILE, ...); nothing was processed
    3    an input is not usable audio (missing, unreadable, empty, NaN samples, ...) or an output could not be
         written; the other files were still processed
    4    model bundle problem (directory missing, checkpoint missing or corrupt, SHA256SUMS mismatch)
    5    server unavailable (remote mode: unreachable, bad token, queue full, draining)
    130  cancelled (Ctrl-C); the file being processed was abandoned, nothing partial was written

Settings are resolved per field, first hit wins: command-line flags > environment variables (CLOAK_MODELS; in
remote mode CLOAK_SERVER / CLOAK_TOKEN_FILE) > config file (--config FILE, else
$XDG_CONFIG_HOME/voicecloak/config.toml or ~/.config/voicecloak/config.toml when present; JSON or TOML, keys =
ProtectConfig field names plus `models` and `device`) > the paper's defaults (cloak.ProtectConfig).

The package, one module per concern (they import one another, never this __init__):

    common        exit codes, environment variable names, UsageError, print_error, the help formatter and parser
    settings      the settings layers (flags > environment > config file > preset > defaults), their flags, the
                  remote target, loading the models the settings name
    protector     make_protector: the one way to a protector, local models or a server, same `protect` call
    jobs          protect's inputs and outputs: which files, where their copies go, in which format
    progress      progress bars / log lines (Reporter) and Ctrl-C handling (cancel_on_sigint)
    protect_cmd, models_cmd, info_cmd, clone_cmd, serve_cmd, sample_cmd   one subcommand each

Adding a subcommand: write `register_<name>(subparsers) -> ArgumentParser` and `run_<name>(args) -> int` (in a
module <name>_cmd.py here, or elsewhere and imported lazily, as `evaluate`, `audacity` and `train-mini` are) and
append `Subcommand(name, register, run)` to SUBCOMMANDS (an optional fourth member says whether it is available
on this install). Raise UsageError for exit 2; ConfigError, AudioError, BundleError and Cancelled are mapped to
their exit codes by `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cloak
from cloak import AudioError, BundleError, Cancelled, CancelToken, ConfigError

from ..remote import ServerUnavailable
from .clone_cmd import CLONE_EPILOG, clone_available, register_clone, run_clone
from .common import (
    ENV_DEBUG,
    ENV_MODELS,
    ENV_SERVER,
    ENV_TOKEN_FILE,
    EXIT_AUDIO,
    EXIT_BUNDLE,
    EXIT_CANCELLED,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_USAGE,
    CloakArgumentParser,
    HelpFormatter,
    UsageError,
    debug_enabled,
    json_line,
    print_error,
)
from .info_cmd import INFO_EPILOG, collect_info, register_info, run_info
from .jobs import (
    AUDIO_EXTENSIONS,
    CLOAKED_TAG,
    LOSSLESS_FORMATS,
    LOSSY_FORMATS,
    Job,
    choose_format,
    expand_inputs,
    plan_jobs,
    preflight,
)
from .models_cmd import MODELS_EPILOG, list_models, register_models, run_models, verify_models
from .progress import Reporter, cancel_on_sigint
from .protect_cmd import PROTECT_EPILOG, SAMPLE_OUTPUT, check_inputs, register_protect, run_protect
from .protector import (
    LocalProtector,
    Protector,
    ServerProtector,
    add_remote_args,
    make_protector,
    remote_protector,
)
from .sample_cmd import register_sample, run_sample
from .serve_cmd import register_serve, run_serve, serve_available
from .settings import (
    RemoteTarget,
    Settings,
    add_common_model_args,
    add_config_flags,
    coerce_field,
    config_file_in_use,
    default_config_path,
    load_config_file,
    load_models_for,
    resolve_device,
    resolve_remote_target,
    resolve_settings,
)

# What `from clients.cli import X` gave before the command line became a package (clients.evaluate_cmd,
# clients.audacity.cli and the tests use these), and the package's own public names.
__all__ = [
    "AUDIO_EXTENSIONS", "CLOAKED_TAG", "CLONE_EPILOG", "ENV_DEBUG", "ENV_MODELS", "ENV_SERVER", "ENV_TOKEN_FILE",
    "EXIT_AUDIO", "EXIT_BUNDLE", "EXIT_CANCELLED", "EXIT_CODES_HELP", "EXIT_INTERNAL", "EXIT_OK", "EXIT_SERVER",
    "EXIT_USAGE", "INFO_EPILOG", "LOSSLESS_FORMATS", "LOSSY_FORMATS", "MAIN_EPILOG", "MODELS_EPILOG",
    "PROTECT_EPILOG", "SAMPLE_OUTPUT", "SUBCOMMANDS", "CancelToken", "CloakArgumentParser", "HelpFormatter", "Job",
    "LocalProtector", "Protector", "RemoteTarget", "Reporter", "ServerProtector", "Settings", "Subcommand",
    "UsageError", "add_common_model_args", "add_config_flags", "add_remote_args", "build_parser", "cancel_on_sigint",
    "check_inputs",
    "choose_format", "clone_available", "coerce_field", "collect_info", "config_file_in_use", "debug_enabled",
    "default_config_path", "expand_inputs", "json_line", "list_models", "load_config_file", "load_models_for",
    "main", "make_protector", "plan_jobs", "preflight", "print_error", "register_clone", "register_info",
    "register_models", "register_protect", "register_sample", "register_serve", "remote_protector",
    "resolve_device", "resolve_remote_target", "resolve_settings", "run_clone", "run_info", "run_models",
    "run_protect", "run_sample", "run_serve", "serve_available", "verify_models",
]


class Subcommand(NamedTuple):
    name: str
    register: Callable[[Any], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]
    available: Callable[[], bool] | None = None  # None = always


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A subcommand function imported on first call (those modules import this one)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("protect", register_protect, run_protect),
    Subcommand("models", register_models, run_models),
    Subcommand("info", register_info, run_info),
    Subcommand("sample", register_sample, run_sample),
    Subcommand("clone", register_clone, run_clone, clone_available),
    Subcommand("serve", register_serve, run_serve, serve_available),
    Subcommand("evaluate", _lazy("clients.evaluate_cmd", "register_evaluate"),
               _lazy("clients.evaluate_cmd", "run_evaluate"), _lazy("clients.evaluate_cmd", "evaluate_available")),
    Subcommand("audacity", _lazy("clients.audacity.cli", "register_audacity"),
               _lazy("clients.audacity.cli", "run_audacity")),
    Subcommand("train-mini", _lazy("clients.train_cmd", "register_train_mini"),
               _lazy("clients.train_cmd", "run_train_mini")),
]

MAIN_EPILOG = f"""\
examples:
  cloak protect --sample                    protects the shipped sample into ./sample.cloaked.flac
  cloak protect talk.wav                    writes talk.cloaked.wav
  cloak protect -r recordings/ -o cloaked/  a whole directory tree
  cloak protect --help                      all settings and output rules
  cloak models verify                       check the model bundle
  cloak info                                versions and devices

environment: {ENV_MODELS} (model bundle directory), {ENV_DEBUG}=1 (tracebacks for internal errors);
{ENV_SERVER} / {ENV_TOKEN_FILE}: protect on a server (remote mode, see cloak protect --help).

{EXIT_CODES_HELP}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = CloakArgumentParser(
        prog="cloak", formatter_class=HelpFormatter, epilog=MAIN_EPILOG,
        description="VoiceCloak: protect voice recordings from diffusion voice cloning with an inaudible "
                    "adversarial perturbation.")
    parser.add_argument("--version", action="version", version=f"voicecloak {cloak.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for sc in SUBCOMMANDS:
        if sc.available is None or sc.available():
            p = sc.register(sub)
            p.set_defaults(_run=sc.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `cloak` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(run(args))
    except UsageError as e:
        print_error(f"error: {e}")
        return EXIT_USAGE
    except ConfigError as e:
        print_error(f"bad settings: {e}")
        return EXIT_USAGE
    except BundleError as e:
        print_error(f"model bundle problem: {e}")
        return EXIT_BUNDLE
    except ServerUnavailable as e:
        print_error(f"server unavailable: {e}")
        return EXIT_SERVER
    except AudioError as e:
        print_error(f"error: {e}")
        return EXIT_AUDIO
    except (Cancelled, KeyboardInterrupt):
        print_error("cancelled")
        return EXIT_CANCELLED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter from erroring at exit
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - the last line of defence: a clear message and exit code 1
        print_error(f"internal error: {type(e).__name__}: {e}")
        if debug_enabled():
            traceback.print_exc()
        else:
            print_error(f"(set {ENV_DEBUG}=1 for a traceback)")
        return EXIT_INTERNAL
