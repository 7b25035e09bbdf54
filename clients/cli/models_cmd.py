"""`cloak models`: which models `cloak protect` would load, with checksums, or load and verify them all."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloak import BundleError

from .common import EXIT_BUNDLE, EXIT_CODES_HELP, EXIT_OK, HelpFormatter, json_line, print_error
from .settings import Settings, add_common_model_args, load_models_for, resolve_settings

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
            json_line({"ok": False, "error": str(e), "exit_code": EXIT_BUNDLE})
        print_error(f"model bundle problem: {e}")
        return EXIT_BUNDLE
    if args.json:
        json_line(report)
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
