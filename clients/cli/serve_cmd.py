"""`cloak serve`: the gRPC protection server (the flags and the server itself live in server.cli)."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from .common import HelpFormatter


def serve_available() -> bool:
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
