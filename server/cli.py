"""`cloak serve` flags (argparse only: importing this needs no grpcio) and the run function."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .config import DEFAULT_LISTEN, ServerConfig, ServerConfigError, parse_size

SERVE_EPILOG = """\
examples:
  cloak serve                                       loopback 127.0.0.1:50051, embedded models, no auth
  cloak serve --models ~/models/diffvc-official --device cuda --max-batch 8
  cloak serve --listen 0.0.0.0:50051 --tls-cert server.pem --tls-key server.key --token-file ~/.cloak-token
  cloak serve --listen 127.0.0.1:0                  any free port (the "listening" log line says which)

Logs are JSON lines on stderr (--log-format text for humans), every job event with its job id.
SIGTERM/SIGINT drains: health turns NOT_SERVING, queued jobs end UNAVAILABLE, running jobs get --drain-timeout
seconds to finish (also while the models load); a second signal stops at once. Exit codes: 0 clean stop, 2 bad
flags, 4 models failed to load. Jobs and results live in memory only: a crash or SIGKILL loses them.
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ServerConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR",
                   help=f"HOST:PORT, [IPV6]:PORT or unix:PATH (default {DEFAULT_LISTEN}; loopback only)")
    p.add_argument("--models", metavar="DIR", help="model bundle directory (default: $CLOAK_MODELS, else embedded)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="U-Net arithmetic during protection: auto = bf16 autocast on CUDA and on CPUs with native "
                        "bf16 (AMX or AVX512-BF16; the perturbation stays fp32), fp32 elsewhere (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: faster steps after a one-off compile per window length")
    p.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"jobs waiting beyond the running ones; more get RESOURCE_EXHAUSTED (default {d.max_queue})")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="K",
                   help=f"jobs stepped together in one batched U-Net call; 1 = no cross-job batching "
                        f"(default {d.max_batch})")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, metavar="S",
                   help=f"longest clip accepted (default {d.max_seconds:g} s)")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain (with --tls-key): serve TLS")
    sec.add_argument("--tls-key", metavar="FILE", help="PEM private key")
    sec.add_argument("--token-file", metavar="FILE",
                     help="require 'authorization: Bearer <token>' on every RPC but health; the file must be mode "
                          "0600")
    sec.add_argument("--tokens-file", metavar="FILE",
                     help="named tokens, one 'NAME TOKEN' per line (mode 0600): each name is an identity with its "
                          "own jobs (only it may Attach/Cancel/GetJob them), fair share and stream caps; names "
                          "appear in logs and metrics")
    sec.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback --listen address without TLS (tokens and audio in clear text)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    ops.add_argument("--metrics-addr", default=d.metrics_addr, metavar="ADDR",
                     help=f"address of the metrics endpoint (default {d.metrics_addr})")
    ops.add_argument("--result-ttl", type=float, default=d.result_ttl, metavar="S",
                     help=f"keep finished jobs for re-attach this long (default {d.result_ttl:g} s)")
    ops.add_argument("--max-results", type=int, default=d.max_results, metavar="N",
                     help=f"finished jobs kept at most (default {d.max_results})")
    ops.add_argument("--max-result-mb", type=float, default=d.max_result_mb, metavar="MB",
                     help=f"memory for kept results at most (default {d.max_result_mb:g} MB)")
    ops.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, metavar="MB",
                     help=f"largest upload of one job (default {d.max_upload_mb:g} MB)")
    ops.add_argument("--drain-timeout", type=float, default=d.drain_timeout, metavar="S",
                     help=f"on SIGTERM, how long running jobs may take to finish (default {d.drain_timeout:g} s)")
    ops.add_argument("--upload-idle-timeout", type=float, default=d.upload_idle_timeout, metavar="S",
                     help=f"an upload sending no PCM bytes for this long ends DEADLINE_EXCEEDED and frees its slot; "
                          f"empty chunks are no progress (default {d.upload_idle_timeout:g} s)")
    ops.add_argument("--memory-budget", type=_size, metavar="SIZE",
                     help="memory for uploads and running jobs together: bytes or 512MiB, 8GiB, 2GB; a job waits "
                          "or is refused (RESOURCE_EXHAUSTED + RetryInfo) when it does not fit (default: half the "
                          "physical memory)")
    ops.add_argument("--max-attach-per-job", type=int, default=d.max_attach_per_job, metavar="N",
                     help=f"open Attach streams on one job (default {d.max_attach_per_job})")
    ops.add_argument("--max-attach-per-client", type=int, default=d.max_attach_per_client, metavar="N",
                     help=f"open Attach streams of one identity (default {d.max_attach_per_client})")
    ops.add_argument("--max-attach", type=int, default=d.max_attach, metavar="N",
                     help=f"open Attach streams in all (default {d.max_attach})")
    ops.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    ops.add_argument("--log-format", choices=["json", "text"], default="json", help="log line format (default json)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        listen=args.listen, models=args.models or os.environ.get("CLOAK_MODELS") or None, device=args.device,
        precision=args.precision, compile=args.compile,
        max_queue=args.max_queue, max_batch=args.max_batch, max_seconds=args.max_seconds, tls_cert=args.tls_cert,
        tls_key=args.tls_key, token_file=args.token_file, insecure=args.insecure, metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr, result_ttl=args.result_ttl, max_results=args.max_results,
        max_result_mb=args.max_result_mb, max_upload_mb=args.max_upload_mb, drain_timeout=args.drain_timeout,
        threads=args.threads, log_format=args.log_format, upload_idle_timeout=args.upload_idle_timeout,
        max_attach_per_job=args.max_attach_per_job, max_attach_per_client=args.max_attach_per_client,
        max_attach=args.max_attach, tokens_file=args.tokens_file, memory_budget=args.memory_budget)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        config.check()
    except ServerConfigError as e:
        print(f"cloak serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    # a SIGTERM while grpc and torch are still importing must drain and exit 0 like any later one
    early = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: early.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        from .app import serve
    except BaseException:
        for s, h in previous.items():
            signal.signal(s, h)
        raise
    return serve(config, stop_requested=early)
