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

Adding a subcommand: write `register_<name>(subparsers) -> ArgumentParser` and `run_<name>(args) -> int` and
append `Subcommand(name, register, run)` to SUBCOMMANDS (an optional fourth member says whether it is available
on this install). Raise UsageError for exit 2; ConfigError, AudioError, BundleError and Cancelled are mapped to
their exit codes by `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TextIO, get_args

import numpy as np

import cloak
from cloak import (
    AudioError,
    BundleError,
    Cancelled,
    CancelToken,
    ConfigError,
    ProtectConfig,
    read_audio,
    write_audio,
)
from cloak.audio import fit_to_budget, output_problem, output_subtype, passthrough_reason, read_exact
from cloak.config import PRESETS, SHAPINGS, Gender
from cloak.files import jsonable
from cloak.sample import SAMPLE_CREDIT, sample_path

from .remote import ServerUnavailable

# --------------------------------------------------------------------------------------------- exit codes

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

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
_EXT_FORMAT = {".wav": "WAV", ".flac": "FLAC", ".aiff": "AIFF", ".aif": "AIFF", ".ogg": "OGG", ".mp3": "MP3"}
_FORMAT_EXT = {"WAV": ".wav", "FLAC": ".flac", "AIFF": ".aiff"}
LOSSLESS_FORMATS = frozenset({"WAV", "FLAC", "AIFF"})
LOSSY_FORMATS = frozenset({"OGG", "MP3", "MPEG"})
CLOAKED_TAG = ".cloaked"
_WIDE_SUBTYPES = frozenset({"PCM_32", "DOUBLE"})  # samples float32 cannot hold: budget and copies use float64
SAMPLE_OUTPUT = "sample.cloaked.flac"  # where `cloak protect --sample` writes without -o (the current directory)


class UsageError(Exception):
    """Bad command line or settings: exit code 2."""


def print_error(msg: str) -> None:
    print(f"cloak: {msg}", file=sys.stderr, flush=True)


def _debug() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2): `cloak protect: error: argument --iterations: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------ settings


def default_config_path() -> Path:
    """$XDG_CONFIG_HOME/voicecloak/config.toml, else ~/.config/voicecloak/config.toml (whether it exists or not)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "voicecloak" / "config.toml"


def config_file_in_use(explicit: str | None) -> Path | None:
    """The config file that will be read: --config FILE, else the default one if it exists, else None."""
    if explicit:
        return Path(explicit).expanduser()
    default = default_config_path()
    return default if default.is_file() else None


def load_config_file(path: Path) -> dict[str, Any]:
    """Parse a JSON or TOML settings file into {field: value}; keys may use '-' or '_'."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    suffix = path.suffix.lower()
    data: Any
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if suffix == ".json" else "TOML" if suffix == ".toml" else "JSON or TOML"
        raise ConfigError(f"{path}: not valid {kind}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object of settings, got {type(data).__name__}")
    known = {f.name for f in fields(ProtectConfig)} | {"models", "device", "precision", "preset"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        out[name] = value
    return out


_DEFAULTS = ProtectConfig()


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    raise TypeError(f"expected a list or a comma-separated string, got {value!r}")


def coerce_field(name: str, value: Any) -> Any:
    """Convert a value from a flag or config file to the type of ProtectConfig.<name>; ConfigError if impossible."""
    default = getattr(_DEFAULTS, name)
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(f"expected true or false, got {value!r}")
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise TypeError(f"expected an integer, got {value!r}")
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a number, got {value!r}")
            return float(value)
        if isinstance(default, tuple):
            items = _split_list(value)
            if default and isinstance(default[0], float):
                if any(isinstance(v, bool) or not isinstance(v, int | float) for v in items):
                    raise TypeError(f"expected numbers, got {value!r}")
                return tuple(float(v) for v in items)
            if any(not isinstance(v, str) for v in items):
                raise TypeError(f"expected names, got {value!r}")
            return tuple(items)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError(f"expected a string, got {value!r}")
            return value
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{name}: {e}") from e
    return value


@dataclass
class Settings:
    config: ProtectConfig
    models: str | None  # bundle directory; None = the embedded checkpoint
    models_source: str
    device: str
    config_file: Path | None
    sources: dict[str, str] = field(default_factory=dict)
    precision: str = "auto"


@dataclass
class RemoteTarget:
    server: str
    token_file: str | None
    tls_ca: str | None


def _remote_target(args: argparse.Namespace) -> RemoteTarget | None:
    """Remote mode when --server or CLOAK_SERVER is given (flags win over the environment)."""
    server = getattr(args, "server", None) or os.environ.get(ENV_SERVER) or None
    token_file = getattr(args, "token_file", None) or os.environ.get(ENV_TOKEN_FILE) or None
    tls_ca = getattr(args, "tls_ca", None)
    if server is None:
        given = [f for f, v in (("--token-file", getattr(args, "token_file", None)), ("--tls-ca", tls_ca)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} need(s) --server (or {ENV_SERVER})")
        return None
    if token_file is not None and not Path(token_file).expanduser().is_file():
        raise UsageError(f"token file not found: {token_file}")
    if tls_ca is not None and not Path(tls_ca).expanduser().is_file():
        raise UsageError(f"--tls-ca: no such file: {tls_ca}")
    return RemoteTarget(server, token_file, tls_ca)


def _remote_protector(target: RemoteTarget) -> Any:
    try:
        from .remote import RemoteProtector, read_token
    except ImportError as e:  # grpcio missing
        raise UsageError(f"remote mode needs the server extra (pip install 'voicecloak[server]'): {e}") from e
    token = read_token(target.token_file) if target.token_file else None
    return RemoteProtector(target.server, token=token, tls_ca=target.tls_ca)


def resolve_device(name: str | None) -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if ":" in name:
            idx = name.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ConfigError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_settings(args: argparse.Namespace, environ: dict[str, str] | None = None,
                     protect_fields: bool = True) -> Settings:
    """flags > environment > config file > defaults, per field. Raises ConfigError (exit 2)."""
    env = os.environ if environ is None else environ
    cfg_path = config_file_in_use(getattr(args, "config", None))
    file_values = load_config_file(cfg_path) if cfg_path is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    preset = getattr(args, "preset", None) or file_values.get("preset")
    if protect_fields and preset is not None:  # a named preset is the layer under the file and the flags
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
        sources.update({k: f"preset {preset}" for k in PRESETS[preset]})
    if protect_fields:
        for f in fields(ProtectConfig):
            flag_value = getattr(args, f.name, None)
            if flag_value is not None:
                values[f.name] = coerce_field(f.name, flag_value)
                sources[f.name] = "--" + f.name.replace("_", "-")
            elif f.name in file_values:
                try:
                    values[f.name] = coerce_field(f.name, file_values[f.name])
                except ConfigError as e:
                    raise ConfigError(f"{cfg_path}: {e}") from e
                sources[f.name] = str(cfg_path)
    try:
        config = ProtectConfig(**values)
    except ConfigError as e:
        msg = str(e)
        name = next((n for n in sources if msg.startswith(n + " ")), None)
        if name is not None and sources[name].startswith("--"):  # one line naming the flag and its range
            raise ConfigError(sources[name] + msg[len(name):]) from e
        raise ConfigError(f"{msg} (set by {sources[name]})" if name is not None else msg) from e
    except TypeError as e:
        raise ConfigError(str(e)) from e

    models_flag = getattr(args, "models", None)
    if models_flag:
        models, models_source = models_flag, "--models"
    elif env.get(ENV_MODELS):
        models, models_source = env[ENV_MODELS], ENV_MODELS
    elif file_values.get("models"):
        if not isinstance(file_values["models"], str):
            raise ConfigError(f"{cfg_path}: models must be a directory path, got {file_values['models']!r}")
        models, models_source = file_values["models"], str(cfg_path)
    else:
        models, models_source = None, "embedded"
    device_name = getattr(args, "device", None) or file_values.get("device") or "auto"
    if not isinstance(device_name, str):
        raise ConfigError(f"{cfg_path}: device must be a string, got {device_name!r}")
    device = resolve_device(device_name)
    precision = getattr(args, "precision", None) or file_values.get("precision") or "auto"
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"{cfg_path}: precision must be auto, fp32 or bf16, got {precision!r}")
    return Settings(config, models, models_source, device, cfg_path, sources, precision)


def _device_arg(value: str) -> str:
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")


def add_common_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--models", metavar="DIR",
                   help=f"model bundle directory (default: ${ENV_MODELS}, then the config file, "
                        "then the embedded cloak-mini checkpoint)")
    if device:
        p.add_argument("--device", type=_device_arg, metavar="cpu|cuda",
                       help="where to run: cpu, cuda, cuda:N or auto (default: auto = cuda when available)")
        p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="U-Net arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AMX or "
                            "AVX512-BF16), fp32 elsewhere; the perturbation stays fp32 (default auto; `cloak info` "
                            "says which is used and why)")
    p.add_argument("--config", metavar="FILE",
                   help=f"settings file, JSON or TOML (default: {default_config_path()} if it exists)")


def load_models_for(settings: Settings) -> cloak.Models:
    try:
        return cloak.load_models(settings.models, settings.device, settings.precision)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - anything going wrong while loading weights is a bundle problem
        where = settings.models or "the embedded checkpoint"
        raise BundleError(f"could not load the models from {where}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------- protect

# Flags for ProtectConfig fields: (metavar, help). A field missing here still gets a flag (generic help).
_FIELD_HELP: dict[str, tuple[str | None, str]] = {
    "epsilon": ("EPS", "l-inf bound of the perturbation, full scale +-1 (default 0.002)"),
    "step_size": ("ALPHA", "PGD step size, <= epsilon (default 4e-5)"),
    "iterations": ("N", "PGD iterations per window (default 50)"),
    "repeats": ("N", "gradient repeats per iteration, batched (default 5)"),
    "t_adv": ("N", "diffusion time steps the attack draws from (default 6)"),
    "weights": ("W", "loss weights lambda_id lambda_ctx lambda_score lambda_sem lambda_voice "
                     "(default 1 4.5 10 0.85 1)"),
    "seed": ("N", "random seed; CPU runs are bit-reproducible (default 0)"),
    "id_encoders": ("LIST", "speaker encoder(s) for the identity loss: ge2e or ge2e,wavlm (default ge2e)"),
    "gender": (None, "the speaker's sex, picks the opposite-gender target (default auto = classify)"),
    "losses": ("LIST", "loss terms to use, comma-separated subset of id,ctx,score,sem,voice (default all; "
                       "id,ctx,score,sem with --shaping none is the paper's engine; voice acts on a model with a "
                       "speaker-adaptive prior, such as the embedded cloak-mini, and is skipped otherwise)"),
    "source_frames": ("N", "mel frames of the surrogate attacker sources (default 192)"),
    "window_seconds": ("S", "long clips are protected in windows of this length (default 10)"),
    "overlap_seconds": ("S", "overlap of consecutive windows, cross-faded (default 1)"),
    "inference_steps": ("N", "sampler steps of the diffusion grid (default 100)"),
    "shaping": (None, "masking (default): keep the perturbation under the voice's masking threshold, so it stays "
                      "inaudible at any recording level and pauses stay clean; none: the paper's plain l-inf box"),
    "masking_margin_db": ("DB", "shaping: how far under the masking threshold the perturbation stays "
                                "(default 26; higher = quieter and weaker)"),
    "masking_exponent": ("G", "shaping: 1 = follow the masking threshold, 0 = flat at the speech level, between: "
                              "more room in weak time-frequency cells (default 0.5)"),
    "early_stop": (None, "stop a window once the attacker's clone already fails (needs voicecloak[eval]; "
                         "off by default: each check costs ~3 iterations)"),
    "early_stop_every": ("N", "iterations between early-stop checks (default 10)"),
    "early_stop_identity_drop": ("D", "early stop: required drop of the clone's GE2E similarity vs a clean "
                                      "clone (default 0.15)"),
    "early_stop_quality": ("MOS", "early stop: the clone's DNSMOS OVRL must be below this (default 2.5)"),
    "random_start": (None, "start PGD from a random perturbation inside the bound instead of zero (off by default)"),
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("protection settings (override the config file; defaults: the paper's settings with "
                                 "perceptual shaping and the voice term)")
    group.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="named settings under the config file and the flags: paper = the VoiceCloak paper's engine "
                            "as published (losses id,ctx,score,sem, shaping none, no voice term)")
    for f in fields(ProtectConfig):
        flag = "--" + f.name.replace("_", "-")
        metavar, text = _FIELD_HELP.get(f.name, (f.name.upper(), f"ProtectConfig.{f.name}"))
        default = getattr(_DEFAULTS, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
        if f.name == "gender":
            kwargs["choices"] = list(get_args(Gender))
        elif f.name == "shaping":
            kwargs["choices"] = list(SHAPINGS)
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, int):
            kwargs.update(type=int, metavar=metavar)
        elif isinstance(default, float):
            kwargs.update(type=float, metavar=metavar)
        elif isinstance(default, tuple) and default and isinstance(default[0], float):
            kwargs.update(type=float, nargs="+", metavar=metavar)  # ProtectConfig checks the count
        else:
            kwargs.update(metavar=metavar)
        group.add_argument(flag, **kwargs)


PROTECT_EPILOG = f"""\
examples:
  cloak protect talk.wav                      writes talk.cloaked.wav next to it
  cloak protect --sample                      the shipped speech sample, into ./sample.cloaked.flac
  cloak protect talk.flac -o safe/talk.flac   explicit output file (FLAC keeps its sample format)
  cloak protect interview.mp3                 writes interview.cloaked.wav (float32 WAV; see below)
  cloak protect -r recordings/ -o cloaked/    a whole tree, mirrored under cloaked/
  cloak protect 'takes/*.wav' --json > report.jsonl
  cloak protect voice.wav --epsilon 0.004 --iterations 100 --gender female --device cuda
  cloak protect voice.wav --config my-settings.toml --force

inputs: files, directories (audio files directly inside; with -r the whole tree) and glob patterns
({' '.join(AUDIO_EXTENSIONS)}). Files named *.cloaked.* are skipped when expanding directories and globs.

outputs: <stem>.cloaked<ext> next to each input unless -o is given; with several inputs -o must be a
directory (created if needed). Rate, channels and length are kept. WAV/FLAC/AIFF inputs keep their container
and sample format: 16/24/32-bit PCM stays 16/24/32-bit (quantised so that the stored samples still differ from
the input's by at most --epsilon; no dither), float stays float. Lossy inputs (MP3, OGG, u-law, ADPCM, ...) are
written as WAV holding what their decoder gives (float or 16-bit), because re-encoding to a lossy codec weakens
the protection. Same input, settings and seed: byte-identical output. Existing files are never replaced
without --force, the input itself never; writes are atomic. Unusable inputs and unwritable outputs are
reported before any model loads. A clip shorter than 0.5 s or silent (nothing above -60 dBFS), and any
input with --iterations 0, is written unchanged with a warning.

settings: flags > environment ({ENV_MODELS}) > config file > defaults. Config file keys are the long flag names
(epsilon, step_size, iterations, ..., plus models and device), e.g. in TOML:
    epsilon = 0.003
    iterations = 100
    weights = [1.0, 4.5, 10.0, 0.85, 1.0]
    id_encoders = ["ge2e"]

progress: bars on a terminal, plain log lines on stderr otherwise; --json prints one JSON object per file on
stdout (input, output, seconds, snr_db, linf, losses_start, losses_end, iterations, windows, gender,
models, config) and nothing else. Ctrl-C abandons the current file and exits 130.

{EXIT_CODES_HELP}
"""


def register_protect(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "protect", help="cloak recordings against diffusion voice cloning",
        description="Add an inaudible adversarial perturbation (|delta| <= epsilon) to voice recordings so that "
                    "diffusion voice conversion cannot clone the voice from them.",
        epilog=PROTECT_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="IN", help="audio file, directory or glob pattern")
    p.add_argument("--sample", action="store_true",
                   help="protect the speech sample shipped with VoiceCloak (written to ./" + SAMPLE_OUTPUT +
                        " unless -o is given; see `cloak sample`)")
    p.add_argument("-o", "--output", metavar="OUT|DIR",
                   help="output file (one input only) or directory (default: <stem>.cloaked<ext> beside each input)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-directories of directory inputs")
    p.add_argument("-f", "--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print one JSON object per file on stdout, nothing else")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output (errors and warnings still shown)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="show what would be written and the effective settings; load no models, write nothing")
    add_common_model_args(p)
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default in fp32: the cores other processes leave free now, at least "
                        "1; in bf16, whose results depend on the thread count: all cores; $OMP_NUM_THREADS when set; "
                        "on 2 cores, 2 threads were 1.6x faster than 1 when idle and 8-10x slower when another "
                        "process kept one core busy: pass --threads 1 on a busy machine)")
    add_config_flags(p)
    remote = p.add_argument_group("remote mode (protect on a `cloak serve` server; models/device flags are ignored)")
    remote.add_argument("--server", metavar="TARGET",
                        help=f"protect on a VoiceCloak server: HOST:PORT, dns:///NAME:PORT or ipv4:A:P,B:P "
                             f"(round-robin over healthy servers) (env {ENV_SERVER})")
    remote.add_argument("--token-file", metavar="FILE", help=f"bearer token for the server (env {ENV_TOKEN_FILE})")
    remote.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the server with (enables TLS)")
    return p


@dataclass
class Job:
    input: Path
    output: Path | None = None
    out_format: str = "WAV"
    out_subtype: str | None = "FLOAT"
    in_format: str | None = None
    in_subtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    create_dirs: bool = False  # -o DIR: missing directories are created
    passthrough: str | None = None  # why the input is written unchanged (too short, silent, --iterations 0)
    reported: bool = False  # its error was already reported (before the models loaded)


def _is_own_output(p: Path) -> bool:
    return p.stem.endswith(CLOAKED_TAG)


def _audio_files_in(directory: Path, recursive: bool) -> list[Path]:
    it = directory.rglob("*") if recursive else directory.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() and not _is_own_output(p):
            out.append(p)
    return sorted(out)


def expand_inputs(items: Sequence[str], recursive: bool) -> tuple[list[tuple[Path, Path | None]], list[Job]]:
    """(file, base directory it was found under or None) for every input, and failed Jobs for missing ones."""
    found: list[tuple[Path, Path | None]] = []
    failed: list[Job] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            files = _audio_files_in(path, recursive)
            if not files:
                hint = "" if recursive else " (use -r to include sub-directories)"
                print_error(f"warning: {item}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found{hint}")
            found.extend((f, path) for f in files)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=recursive))
            hits = 0
            for m in map(Path, matches):
                if m.is_dir():
                    files = _audio_files_in(m, recursive)
                    found.extend((f, m) for f in files)
                    hits += len(files)
                elif m.is_file() and m.suffix.lower() in AUDIO_EXTENSIONS and not _is_own_output(m):
                    found.append((m, None))
                    hits += 1
            if not hits:
                failed.append(Job(path, error=f"{item}: no audio files match this pattern"))
        else:
            failed.append(Job(path, error=f"{item}: no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for f, base in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, base))
    return unique, failed


def choose_format(in_path: Path, in_format: str | None, in_subtype: str | None, explicit: Path | None,
                  epsilon: float = 0.002) -> tuple[str, str | None, str, list[str]]:
    """(container, subtype, extension, warnings) of the protected copy of one input.

    Lossless containers (WAV, FLAC, AIFF) are kept with the input's own subtype: 16/24/32-bit PCM stays that
    bit depth, float stays float (see cloak.audio.output_subtype for the few exceptions, each with a warning).
    Lossy inputs (OGG, MP3, or a lossy codec inside WAV/AIFF) are written losslessly as what their decoder
    gives. An explicit -o decides the container; a lossy one (.ogg, .mp3) is honoured with a warning."""
    warnings: list[str] = []
    if explicit is not None:
        ext = explicit.suffix
        fmt = _EXT_FORMAT[ext.lower()]
        if fmt in LOSSY_FORMATS:
            warnings.append(f"{explicit}: lossy {fmt} encoding weakens the protection; "
                            "a lossless output (.wav, .flac) is strongly recommended")
            return fmt, None, ext, warnings
    elif in_format in LOSSLESS_FORMATS:
        fmt = in_format
        ext = in_path.suffix if _EXT_FORMAT.get(in_path.suffix.lower()) == in_format else _FORMAT_EXT[in_format]
    else:
        fmt, ext = "WAV", ".wav"
        if in_format in LOSSY_FORMATS:
            warnings.append(f"{in_path}: input is lossy ({in_format}/{in_subtype}); the protected copy is written as "
                            "WAV, because re-encoding it to a lossy format would weaken the protection")
        else:
            warnings.append(f"{in_path}: {in_format} container is written as WAV")
    subtype, note = output_subtype(fmt, in_subtype, epsilon)
    if note is not None and in_format not in LOSSY_FORMATS:
        warnings.append(f"{in_path}: {note}")
    return fmt, subtype, ext, warnings


def plan_jobs(files: list[tuple[Path, Path | None]], output: str | None, epsilon: float = 0.002) -> list[Job]:
    """Decide every output path and format (reads file headers only). UsageError for an impossible -o."""
    import soundfile as sf

    mode, target = "beside", None
    if output is not None:
        target = Path(output).expanduser()
        if target.is_dir() or output.endswith(("/", os.sep)):
            mode = "dir"
        elif target.exists() or target.suffix.lower() in AUDIO_EXTENSIONS:
            if target.suffix.lower() not in AUDIO_EXTENSIONS:
                raise UsageError(f"-o {output}: exists and is not an audio file name or a directory")
            if len(files) > 1:
                raise UsageError(f"-o {output}: {len(files)} inputs need an output directory, not a file name")
            mode = "file"
        elif target.suffix == "":
            mode = "dir"
        else:
            raise UsageError(f"-o {output}: unknown audio extension {target.suffix!r} "
                             f"(use one of {' '.join(AUDIO_EXTENSIONS)}, or a directory)")
    jobs = []
    for path, base in files:
        job = Job(path)
        try:
            info = sf.info(str(path))
            job.in_format, job.in_subtype = str(info.format), str(info.subtype)
        except Exception as e:  # noqa: BLE001 - soundfile raises several types for non-audio files
            job.error = f"{path}: not readable as audio: {e}"
            jobs.append(job)
            continue
        explicit = target if mode == "file" else None
        job.out_format, job.out_subtype, ext, job.warnings = choose_format(path, job.in_format, job.in_subtype,
                                                                           explicit, epsilon)
        job.create_dirs = mode == "dir"
        name = f"{path.stem}{CLOAKED_TAG}{ext}"
        if mode == "file":
            assert target is not None
            job.output = target
        elif mode == "dir":
            assert target is not None
            rel = path.parent.relative_to(base) if base is not None else Path()
            job.output = target / rel / name
        else:
            job.output = path.with_name(name)
        jobs.append(job)
    return jobs


def preflight(jobs: list[Job], force: bool) -> list[str]:
    """Problems that stop the whole run before anything is computed (exit 2)."""
    problems = []
    inputs = {j.input.resolve() for j in jobs}
    claimed: dict[Path, Path] = {}
    for j in jobs:
        if j.output is None:
            continue
        out = j.output.resolve()
        if out in inputs:
            problems.append(f"{j.output}: is an input; the original recording is never overwritten")
        elif out in claimed:
            problems.append(f"{claimed[out]} and {j.input} would both be written to {j.output}")
        elif j.output.is_dir():
            problems.append(f"{j.output}: is a directory")
        elif j.output.exists() and not force:
            problems.append(f"{j.output}: already exists (use --force to replace it)")
        elif (why := output_problem(j.output, create_dirs=j.create_dirs)) is not None:
            problems.append(f"cannot write {j.output}: {why}")
        claimed[out] = j.input
    return problems


def check_inputs(jobs: list[Job], cfg: ProtectConfig, args: argparse.Namespace, reporter: Reporter) -> list[int]:
    """Read every input once before any model loads: report the unusable ones at once (exit 3, the others are
    still processed) and mark those to be written unchanged (shorter than 0.5 s, silent, --iterations 0)."""
    codes = []
    for job in jobs:
        if job.error is None:
            try:
                audio = read_audio(job.input)
            except AudioError as e:
                job.error = str(e)
            else:
                if cfg.iterations == 0:
                    job.passthrough = "--iterations 0: no perturbation computed"
                else:
                    job.passthrough = passthrough_reason(audio.samples, audio.sample_rate)
                del audio
        if job.error is not None:
            codes.append(_failure(args, job, job.error, EXIT_AUDIO, reporter))
            job.reported = True
    return codes


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Reporter:
    """Progress on stderr: tqdm bars on a terminal, plain log lines otherwise, nothing with quiet."""

    def __init__(self, n_files: int, config: ProtectConfig, quiet: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and _columns(self.stream) > 0
        self.n = n_files
        self.weights = config.loss_weights
        self.overall: Any = None
        self.bar: Any = None
        self.index = 0
        self.name = ""
        self.last_decile = -1
        self.last_log = 0.0
        if self.tty and not quiet:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=n_files, desc="files", unit="file", position=0, file=self.stream,
                                dynamic_ncols=True)

    def message(self, msg: str) -> None:
        """A line on stderr that does not break the bars."""
        if self.overall is not None:
            self._tqdm.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def result(self, line: str) -> None:
        """A line on stdout (a result) that does not break the bars when both go to the same terminal."""
        if self.overall is not None:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.message(msg)

    def start_file(self, index: int, path: Path) -> None:
        self.index, self.name = index, path.name
        self.last_decile, self.last_log = -1, time.monotonic()
        if self.overall is not None:
            self.bar = self._tqdm(total=None, desc=self.name[:30], unit="it", position=1, leave=False,
                                  file=self.stream, dynamic_ncols=True)

    def _terms(self, losses: dict[str, float]) -> str:
        total = sum(self.weights.get(k, 0.0) * v for k, v in losses.items())
        return " ".join(f"{k}={v:.4g}" for k, v in losses.items()) + f" total={total:.4g}"

    def __call__(self, p: cloak.Progress) -> None:
        if self.quiet:
            return
        done = p.window * p.iterations + p.iteration
        total = p.windows * p.iterations
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.reset(total=total)
            self.bar.n = done
            self.bar.set_postfix_str(f"win {p.window + 1}/{p.windows} {self._terms(p.losses)}", refresh=False)
            self.bar.refresh()
            return
        decile = int(10 * done / max(total, 1))
        now = time.monotonic()
        if decile != self.last_decile or done == total or now - self.last_log >= 60:
            self.last_decile, self.last_log = decile, now
            self.message(f"cloak: [{self.index + 1}/{self.n}] {self.name}: iteration {done}/{total} "
                         f"({100 * done / max(total, 1):.0f}%) {self._terms(p.losses)} "
                         f"elapsed {p.elapsed_s:.1f}s eta {p.eta_s:.1f}s")

    def end_file(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.overall is not None:
            self.overall.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.overall is not None:
            self.overall.close()


@contextlib.contextmanager
def cancel_on_sigint(token: CancelToken, reporter: Reporter | None = None) -> Iterator[None]:
    """First Ctrl-C cancels the token (the engine stops at the next iteration); a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise KeyboardInterrupt
        token.cancel()
        msg = "cloak: interrupted; stopping (Ctrl-C again to abort immediately)"
        if reporter is not None:
            reporter.message(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _json_line(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=jsonable), flush=True)


def _failure(args: argparse.Namespace, job: Job, msg: str, code: int, reporter: Reporter) -> int:
    reporter.message(f"cloak: error: {msg}")
    if args.json:
        reporter.result(json.dumps({"input": str(job.input), "output": None if job.output is None else str(job.output),
                                    "ok": False, "error": msg, "exit_code": code}))
    return code


def run_protect(args: argparse.Namespace) -> int:
    remote = _remote_target(args)
    settings = resolve_settings(args)
    cfg = settings.config
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    inputs = list(args.inputs)
    output = args.output
    if args.sample:
        if inputs:
            raise UsageError("--sample protects the shipped sample only: give no other inputs")
        inputs = [str(sample_path())]
        if output is None:  # not beside the sample, inside the installed package
            output = SAMPLE_OUTPUT
    elif not inputs:
        raise UsageError("no inputs: give audio files, directories or glob patterns (or --sample)")
    files, missing = expand_inputs(inputs, args.recursive)
    jobs = plan_jobs(files, output, cfg.epsilon) if files else []
    jobs = missing + jobs
    if not jobs:
        raise UsageError("no audio files to process")
    problems = preflight(jobs, args.force)
    if problems:
        for msg in problems:
            print_error(f"error: {msg}")
        print_error("nothing was written")
        return EXIT_USAGE

    if args.dry_run:
        for j in jobs:
            for w in j.warnings:
                print_error(f"warning: {w}")
            if args.json:
                _json_line({"input": str(j.input), "output": None if j.output is None else str(j.output),
                            "format": j.out_format, "subtype": j.out_subtype, "error": j.error,
                            "models_dir": settings.models, "device": settings.device, "config": cfg.to_dict()})
            else:
                print(f"{j.input} -> {j.output}" if j.error is None else f"{j.input}: {j.error}")
        if not args.json:
            print(f"models: {settings.models or 'embedded'} ({settings.models_source}), device: {settings.device}, "
                  f"config file: {settings.config_file or 'none'}")
            print("settings: " + json.dumps(cfg.to_dict(), default=jsonable))
        return EXIT_OK

    threads = args.threads
    if threads is None and settings.device == "cpu" and remote is None:
        import torch

        from cloak.bundle import resolve_precision
        from cloak.cpu import default_threads

        # fp32 results do not depend on the thread count, so a busy core need not get a thread (see --help); bf16
        # autocast results do (oneDNN splits its bf16 reductions by thread), so there the count stays fixed (all
        # cores) and the same command and seed keep giving the same bytes
        if resolve_precision(settings.precision, torch.device("cpu")) == "fp32":
            threads = default_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    token = CancelToken()
    reporter = Reporter(len(jobs), cfg, args.quiet)
    codes = check_inputs(jobs, cfg, args, reporter)  # fail fast: before any model loads
    need_models = any(j.error is None and j.passthrough is None for j in jobs)
    cancelled = False
    model_ids: list[dict[str, Any]] = []
    try:
        with cancel_on_sigint(token, reporter):
            if not need_models:
                pass
            elif remote is not None:
                protector = _remote_protector(remote)
                info = protector.info()
                reporter.info(f"cloak: protecting on {remote.server} (voicecloak {info.version}, {info.device})")
                model_ids = [{"name": m.name, "sha256": m.sha256} for m in info.models]
                settings = dataclasses.replace(settings, device=f"remote:{info.device}")
            else:
                reporter.info(f"cloak: loading models ({settings.models or 'embedded'}) on {settings.device}")
                models = load_models_for(settings)
                if "wavlm" in cfg.id_encoders and models.wavlm is None:
                    raise BundleError("id_encoders asks for 'wavlm' but the model bundle has no wavlm-sv/ directory")
                model_ids = [{"name": i.name, "sha256": i.sha256} for i in models.info]
            for index, job in enumerate(jobs):
                if token.cancelled:
                    cancelled = True
                    break
                if job.reported:
                    reporter.end_file()
                    continue
                if job.error is not None:
                    codes.append(_failure(args, job, job.error, EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                assert job.output is not None
                for w in job.warnings:
                    reporter.message(f"cloak: warning: {w}")
                try:
                    audio = read_audio(job.input)
                    # float32 holds every sample of up to 24-bit PCM and of FLOAT exactly, not of PCM_32 / DOUBLE
                    exact = read_exact(job.input) if job.in_subtype in _WIDE_SUBTYPES else audio.samples
                except AudioError as e:
                    codes.append(_failure(args, job, str(e), EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                metrics: dict[str, Any]
                if job.passthrough is not None:
                    reporter.message(f"cloak: warning: {job.input}: {job.passthrough}; the output is the input "
                                     "unchanged")
                    stored = fit_to_budget(exact, exact, cfg.epsilon, job.out_subtype)
                    metrics = {"seconds": 0.0, "iterations": 0, "windows": 0, "config": cfg.to_dict(),
                               "warning": f"{job.passthrough}; the output is the input unchanged"}
                else:
                    reporter.start_file(index, job.input)
                    try:
                        if remote is not None:
                            result = protector.protect(audio.samples, audio.sample_rate, cfg, progress=reporter,
                                                       cancel=token)
                        else:
                            result = cloak.protect(audio.samples, audio.sample_rate, models, cfg,
                                                   progress=reporter, cancel=token)
                    except Cancelled:
                        cancelled = True
                        break
                    except AudioError as e:
                        codes.append(_failure(args, job, f"{job.input}: {e}", EXIT_AUDIO, reporter))
                        reporter.end_file()
                        continue
                    except (BundleError, KeyboardInterrupt, ServerUnavailable, ConfigError):
                        raise
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory on one long file: go on with the rest
                        if _debug():
                            traceback.print_exc()
                        codes.append(_failure(args, job, f"{job.input}: internal error: {type(e).__name__}: {e}",
                                              EXIT_INTERNAL, reporter))
                        reporter.end_file()
                        continue
                    if token.cancelled:
                        cancelled = True
                        break
                    metrics = result.metrics
                    stored = fit_to_budget(result.audio, exact, cfg.epsilon, job.out_subtype)
                try:
                    if job.create_dirs:
                        job.output.parent.mkdir(parents=True, exist_ok=True)
                    write_audio(job.output, stored, audio.sample_rate, subtype=job.out_subtype,
                                format=job.out_format, overwrite=args.force, protect_original=job.input)
                except (AudioError, OSError) as e:
                    codes.append(_failure(args, job, f"cannot write {job.output}: {e}", EXIT_AUDIO, reporter))
                    reporter.end_file()
                    continue
                reporter.end_file()
                codes.append(EXIT_OK)
                _report_file(args, job, audio.sample_rate, exact, stored, metrics, model_ids, settings, reporter)
    finally:
        reporter.close()
    if cancelled:
        print_error("cancelled; the file in progress was abandoned (nothing partial written)")
        return EXIT_CANCELLED
    failed = sum(c != EXIT_OK for c in codes)
    if len(jobs) > 1 and not args.quiet:
        print_error(f"{len(jobs) - failed} of {len(jobs)} file(s) protected" + (f", {failed} failed" if failed else ""))
    for code in (EXIT_BUNDLE, EXIT_INTERNAL, EXIT_AUDIO):
        if code in codes:
            return code
    return EXIT_OK


def _report_file(args: argparse.Namespace, job: Job, sample_rate: int, exact: np.ndarray, stored: np.ndarray,
                 metrics: dict[str, Any], model_ids: list[dict[str, Any]], settings: Settings,
                 reporter: Reporter) -> None:
    x = exact.astype(np.float64)
    diff = stored.astype(np.float64) - x
    noise = float(np.sum(diff**2))
    snr: float | None = None
    if noise > 0:
        snr = 10 * math.log10(max(float(np.sum(x**2)), 1e-20) / noise)
    linf = float(np.max(np.abs(diff))) if diff.size else 0.0
    channels = 1 if x.ndim == 1 else int(x.shape[1])
    if args.json:
        reporter.result(json.dumps({
            "input": str(job.input), "output": str(job.output), "ok": True,
            "seconds": metrics.get("seconds"), "snr_db": snr, "linf": linf,
            "losses_start": metrics.get("losses_start"), "losses_end": metrics.get("losses_end"),
            "iterations": metrics.get("iterations"), "windows": metrics.get("windows"),
            "gender": metrics.get("gender"), "opposite_speaker": metrics.get("opposite_speaker"),
            "models": model_ids, "device": settings.device, "config": metrics.get("config"),
            "sample_rate": sample_rate, "channels": channels, "frames": int(x.shape[0]),
            "format": job.out_format, "subtype": job.out_subtype, "warning": metrics.get("warning"),
        }, default=jsonable))
    elif linf == 0:
        reporter.result(f"{job.input} -> {job.output}  (unchanged: {metrics.get('warning') or 'no perturbation'})")
    else:
        reporter.result(f"{job.input} -> {job.output}  (SNR {snr:.1f} dB, max |delta| {linf:.2g}, "
                        f"{metrics.get('seconds', 0.0):.1f} s)")


# ---------------------------------------------------------------------------------------------- models

MODELS_EPILOG = f"""\
examples:
  cloak models                       what `cloak protect` would load (bundle or embedded), with checksums
  cloak models list --models ~/voicecloak-models --json
  cloak models verify                load every model and check the bundle's SHA256SUMS

bundle layout (see cloak.bundle):
  diffvc.pt (or vc_libritts_wodyn.pt / vc_vctk_wodyn.pt), optional diffvc.json, ge2e.pt, wavlm-sv/,
  vocoder/, and SHA256SUMS ("<sha256>  <relative path>" lines, checked on every load).

{EXIT_CODES_HELP}
"""


def register_models(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list or verify the model bundle",
                              description="Show which models `cloak protect` uses, or load and verify them.",
                              epilog=MODELS_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "verify"], default="list",
                   help="list (default): paths and checksums without loading; verify: load everything and check "
                        "SHA256SUMS")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_common_model_args(p)
    return p


def _dir_digest(directory: Path, patterns: Sequence[str]) -> str | None:
    import hashlib

    files = [f for pat in patterns for f in sorted(directory.glob(pat)) if f.is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def list_models(settings: Settings) -> dict[str, Any]:
    """What load_models would use, without loading anything (hashes are computed)."""
    from cloak.bank import BANK_DIR
    from cloak.bundle import find_diffvc, resolve_bundle, sha256_file
    from cloak.models.ge2e import resemblyzer_weights

    root = resolve_bundle(settings.models) if settings.models else None
    dev, dtype = settings.device, "float32"
    entries: list[dict[str, Any]] = []
    dv = find_diffvc(root)
    entries.append({"name": "diffvc" if root else "diffvc:cloak-mini", "path": str(dv), "sha256": sha256_file(dv),
                    "device": dev, "dtype": dtype})
    if root is not None and (root / "diffvc.json").is_file():
        entries.append({"name": "diffvc.json", "path": str(root / "diffvc.json"),
                        "sha256": sha256_file(root / "diffvc.json"), "device": None, "dtype": None})
    if root is not None and (root / "ge2e.pt").is_file():
        ge2e = root / "ge2e.pt"
    else:
        try:
            ge2e = resemblyzer_weights()
        except FileNotFoundError as e:
            raise BundleError(str(e)) from e
    entries.append({"name": "ge2e", "path": str(ge2e), "sha256": sha256_file(ge2e), "device": dev, "dtype": dtype})
    if root is not None and (root / "wavlm-sv").is_dir():
        entries.append({"name": "wavlm-sv", "path": str(root / "wavlm-sv"),
                        "sha256": _dir_digest(root / "wavlm-sv", ["*.safetensors", "*.bin"]),
                        "device": dev, "dtype": dtype})
    if root is not None and (root / "vocoder").is_dir():
        entries.append({"name": "vocoder", "path": str(root / "vocoder"),
                        "sha256": _dir_digest(root / "vocoder", ["generator*.pth*", "g_*"]),
                        "device": dev, "dtype": dtype})
    entries.append({"name": "voicebank", "path": str(BANK_DIR), "sha256": None, "device": None, "dtype": None})
    sums = root / "SHA256SUMS" if root is not None else None
    return {"bundle": None if root is None else str(root), "source": settings.models_source,
            "sha256sums": None if sums is None or not sums.is_file() else str(sums), "device": dev,
            "models": entries}


def verify_models(settings: Settings) -> dict[str, Any]:
    """Load every model (checking SHA256SUMS first); BundleError on any problem."""
    from cloak.bundle import resolve_bundle

    root = resolve_bundle(settings.models) if settings.models else None
    models = load_models_for(settings)
    entries = [i.to_dict() for i in models.info]
    if models.vocoder_dir is not None:
        from cloak.models.hifigan import HiFiGAN

        try:
            HiFiGAN.load(models.vocoder_dir, device=settings.device)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"{models.vocoder_dir}: vocoder does not load: {type(e).__name__}: {e}") from e
        entries.append({"name": "vocoder", "path": str(models.vocoder_dir), "sha256": None,
                        "device": settings.device, "dtype": "float32"})
    sums = root / "SHA256SUMS" if root is not None else None
    return {"ok": True, "bundle": None if root is None else str(root), "source": settings.models_source,
            "sha256sums": None if sums is None or not sums.is_file() else str(sums),
            "voicebank_speakers": len(models.bank.speakers), "models": entries}


def run_models(args: argparse.Namespace) -> int:
    settings = resolve_settings(args, protect_fields=False)
    try:
        report = verify_models(settings) if args.action == "verify" else list_models(settings)
    except BundleError as e:
        if args.json:
            _json_line({"ok": False, "error": str(e), "exit_code": EXIT_BUNDLE})
        print_error(f"model bundle problem: {e}")
        return EXIT_BUNDLE
    if args.json:
        _json_line(report)
        return EXIT_OK
    print(f"bundle: {report['bundle'] or 'embedded (cloak/data)'}  (from {report['source']})")
    if args.action == "verify":
        print(f"SHA256SUMS: {'verified (' + report['sha256sums'] + ')' if report['sha256sums'] else 'none'}")
    else:
        print(f"SHA256SUMS: {report['sha256sums'] or 'none'}")
    for m in report["models"]:
        extra = f"  {m['device']} {m['dtype']}" if m.get("device") else ""
        print(f"  {m['name']:<18} {m['sha256'] or '-':<64}  {m['path']}{extra}")
    if args.action == "verify":
        print(f"all models load ({report['voicebank_speakers']} voice bank speakers)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ info

INFO_EPILOG = f"""\
examples:
  cloak info           versions, CUDA devices, where models and settings come from
  cloak info --json    the same as one JSON object (attach it to bug reports)

{EXIT_CODES_HELP}
"""


def register_info(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, devices and paths",
                              description="Show versions, device availability, and where models and settings "
                                          "come from.", epilog=INFO_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--config", metavar="FILE", help="report this settings file instead of the default one")
    return p


def collect_info(config: str | None = None) -> dict[str, Any]:
    from importlib import metadata

    import soundfile as sf
    import torch

    from cloak.bundle import EMBEDDED_DIFFVC

    try:
        dist_version = metadata.version("voicecloak")
    except metadata.PackageNotFoundError:
        dist_version = None
    cuda = torch.cuda.is_available()
    env_models = os.environ.get(ENV_MODELS) or None
    cfg = config_file_in_use(config)
    return {
        "precision": _precision_info(cfg),
        "versions": {"voicecloak": cloak.__version__, "voicecloak_dist": dist_version, "torch": torch.__version__,
                     "numpy": np.__version__, "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__,
                     "python": platform.python_version()},
        "platform": platform.platform(),
        "devices": {"cpu_threads": torch.get_num_threads(), "cuda": cuda, "cuda_version": torch.version.cuda,
                    "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if cuda else []},
        "models": {"default": env_models or str(EMBEDDED_DIFFVC), "source": ENV_MODELS if env_models else "embedded",
                   "exists": Path(env_models).is_dir() if env_models else EMBEDDED_DIFFVC.is_file()},
        "config_file": None if cfg is None else str(cfg),
        "config_file_exists": None if cfg is None else cfg.is_file(),
        "default_config_file": str(default_config_path()),
        "environment": {k: os.environ.get(k) for k in (ENV_MODELS, ENV_SERVER, ENV_TOKEN_FILE)},
    }


def _precision_info(cfg: Path | None) -> dict[str, Any]:
    """The U-Net arithmetic a protection here would use with the settings file's device and precision (or auto)."""
    import torch

    from cloak.bundle import precision_choice
    from cloak.cpu import cpu_bf16_flags, cpu_cores, cpu_model, default_threads

    out: dict[str, Any] = {"cpu_model": cpu_model(), "cpu_cores": cpu_cores(),
                           "cpu_native_bf16": list(cpu_bf16_flags()),
                           "protect_threads": default_threads() or torch.get_num_threads()}
    try:
        values = load_config_file(cfg) if cfg is not None and cfg.is_file() else {}
        setting = str(values.get("precision") or "auto")
        device = resolve_device(values.get("device") if isinstance(values.get("device"), str) else None)
        used, why = precision_choice(setting, torch.device(device))
    except (ConfigError, ValueError) as e:
        return {**out, "setting": None, "device": None, "used": None, "reason": f"settings unusable: {e}"}
    if used == "bf16" and device == "cpu":  # bf16 results depend on the thread count: it stays fixed there
        out["protect_threads"] = torch.get_num_threads()
    return {**out, "setting": setting, "device": device, "used": used, "reason": why}


def run_info(args: argparse.Namespace) -> int:
    info = collect_info(args.config)
    if args.json:
        _json_line(info)
        return EXIT_OK
    v, d, m = info["versions"], info["devices"], info["models"]
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None))
    print(f"platform: {info['platform']}")
    print(f"cuda: {'yes' if d['cuda'] else 'no'}" + (f" (CUDA {d['cuda_version']}: {', '.join(d['cuda_devices'])})"
                                                    if d["cuda"] else "") + f"; cpu threads: {d['cpu_threads']}")
    print(f"models: {m['default']} (from {m['source']}{'' if m['exists'] else ', MISSING'})")
    pr = info["precision"]
    print(f"cpu: {pr['cpu_model']}, {pr['cpu_cores']} core(s); a protection started now would use "
          f"{pr['protect_threads']} thread(s) (fp32: the cores other processes leave free; bf16: all cores; "
          "--threads N overrides)")
    print(f"precision: {pr['used'] or '?'} on {pr['device'] or '?'} ({pr['reason']}; --precision fp32|bf16 overrides)")
    print(f"config file: {info['config_file'] or 'none'} (default location {info['default_config_file']})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- clone

CLONE_EPILOG = f"""\
examples:
  cloak clone --source src.wav --reference voice.wav -o out.wav       convert src.wav to the voice of voice.wav
  cloak clone --source src.wav --reference voice.cloaked.wav -o c.wav  check that a cloaked reference resists
  cloak clone a.wav b.wav --reference voice.wav -o clones/ --json      several sources into a directory
  cloak clone --source src.wav --reference voice.wav --steps 100 --mode em --seed 3 --no-postfilter

Outputs are float32 WAV at 22.05 kHz (DiffVC + HiFi-GAN V1; needs the vocoder from `pip install 'voicecloak[eval]'`).

{EXIT_CODES_HELP}
"""


def _clone_available() -> bool:
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
            _json_line(r)
        else:
            print(r["output"])
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- serve


def _serve_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "grpc_health", "grpc_reflection"))


def register_serve(subparsers: Any) -> argparse.ArgumentParser:
    from server.cli import SERVE_EPILOG, add_arguments

    p = subparsers.add_parser(
        "serve", help="run the gRPC protection server (models stay resident, jobs are queued and batched)",
        description="Serve cloak.v1.CloakService: protection jobs from many clients share resident models; PGD runs "
                    "several jobs in one batched U-Net call. Health (grpc.health.v1) and reflection included.",
        epilog=SERVE_EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from server.cli import run

    return run(args)


# ---------------------------------------------------------------------------------------------- wiring


# ---------------------------------------------------------------------------------------------- sample


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
    Subcommand("clone", register_clone, run_clone, _clone_available),
    Subcommand("serve", register_serve, run_serve, _serve_available),
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
    parser = _Parser(
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
        if _debug():
            traceback.print_exc()
        else:
            print_error(f"(set {ENV_DEBUG}=1 for a traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
