"""`cloak info`: versions, devices, and where models and settings come from."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

import cloak
from cloak import ConfigError

from .common import ENV_MODELS, ENV_SERVER, ENV_TOKEN_FILE, EXIT_CODES_HELP, EXIT_OK, HelpFormatter, json_line
from .settings import config_file_in_use, default_config_path, load_config_file, resolve_device

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
        json_line(info)
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
