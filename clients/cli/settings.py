"""The settings layers of the `cloak` command line, per field, first hit wins: command-line flags > environment
variables > config file > named preset > the defaults (cloak.ProtectConfig); plus the flags that set them, the remote
target (--server / CLOAK_SERVER) and loading the models the settings name."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import cloak
from cloak import BundleError, ConfigError, ProtectConfig
from cloak.config import PRESETS, SHAPINGS, Gender, preset_values

from .common import ENV_MODELS, ENV_SERVER, ENV_TOKEN_FILE, UsageError


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
# fields whose default is None ("chosen for you") and whose values are numbers
OPTIONAL_NUMBERS = ("masking_exponent",)


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    raise TypeError(f"expected a list or a comma-separated string, got {value!r}")


def coerce_field(name: str, value: Any) -> Any:
    """Convert a value from a flag or config file to the type of ProtectConfig.<name>; ConfigError if impossible."""
    default = getattr(_DEFAULTS, name)
    if name in OPTIONAL_NUMBERS:
        default = 0.0
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


def resolve_remote_target(args: argparse.Namespace) -> RemoteTarget | None:
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
        preset_fields = preset_values(preset)
        values.update(preset_fields)
        sources.update({k: f"preset {preset}" for k in preset_fields})
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


# Flags for ProtectConfig fields: (metavar, help). A field missing here still gets a flag (generic help).
_FIELD_HELP: dict[str, tuple[str | None, str]] = {
    "epsilon": ("EPS", "l-inf bound of the perturbation, full scale +-1 (default 0.002)"),
    "step_size": ("ALPHA", "PGD step size, <= epsilon (default 4e-5)"),
    "iterations": ("N", "PGD iterations per window (default 50)"),
    "repeats": ("N", "gradient repeats per iteration, batched (default 5)"),
    "t_adv": ("N", "diffusion time steps the attack draws from (default 6)"),
    "weights": ("W", "loss weights lambda_id lambda_ctx lambda_score lambda_sem lambda_voice "
                     "(default 1 4.5 10 0.85 10)"),
    "seed": ("N", "random seed; one-thread CPU runs are bit-reproducible (default 0)"),
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
    "masking_exponent": ("G", "shaping: fix the exponent for every window: 1 = follow the masking threshold, 0 = flat "
                              "at the speech level, between: more room in weak time-frequency cells (default: "
                              "chosen per window for --quality-target)"),
    "quality_target": ("PESQ", "shaping: the PESQ-WB each window is predicted to keep; the flattest (strongest) "
                               "shaping that keeps it is chosen per window (default 3.9; ignored with "
                               "--masking-exponent)"),
    "early_stop": (None, "stop a window once the attacker's clone already fails (needs voicecloak[eval]; "
                         "off by default: each check costs ~3 iterations)"),
    "early_stop_every": ("N", "iterations between early-stop checks (default 10)"),
    "early_stop_identity_drop": ("D", "early stop: required drop of the clone's GE2E similarity vs a clean "
                                      "clone (default 0.15)"),
    "early_stop_quality": ("MOS", "early stop: the clone's DNSMOS OVRL must be below this (default 2.5)"),
    "random_start": (None, "start PGD from a random perturbation inside the bound instead of zero (off by default)"),
    "eot": ("LIST", "optimise for the file as a cloner may get it: comma-separated subset of mp3 (64-128 kb/s), "
                    "resample (16 kHz and back), gain (+-3 dB), one drawn per step (default none)"),
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
        default = 0.0 if f.name in OPTIONAL_NUMBERS else getattr(_DEFAULTS, f.name)
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
