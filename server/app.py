"""CloakServer: the grpc.Server with CloakService, health, reflection, auth and metrics; `serve()` runs one."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from cloak import BundleError
from cloak.bundle import Models

from . import logs, pcm
from .auth import TokenInterceptor
from .config import MAX_MESSAGE_BYTES, ServerConfig, ServerConfigError, is_loopback, load_token, load_tokens
from .events import ServingState
from .gen import cloak_service_pb2_grpc as pb_grpc
from .metrics import Metrics
from .scheduler import Scheduler
from .service import SERVICE_NAME, CloakServicer
from .streams import StreamCaps, peer_host

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_BUNDLE = 0, 1, 2, 4
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVER_OPTIONS = [
    # chunks are <= 1 MiB; room above it so that an oversize chunk gets our INVALID_ARGUMENT, not a size error
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # accept client keepalive pings every >= 10 s even while a queued job's stream carries no data
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]


UNARY_THREADS = 32  # GetServerInfo, GetJob, Cancel (each returns within a few seconds), auth refusals


def _pooled_health(pool: ThreadPoolExecutor) -> health.HealthServicer:
    """A HealthServicer whose Check runs in its own pool (Watch is non-blocking and needs no thread)."""
    servicer = health.HealthServicer()
    check = servicer.Check

    def Check(request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - the gRPC method name
        return check(request, context)

    Check.experimental_thread_pool = pool  # type: ignore[attr-defined]
    servicer.Check = Check  # type: ignore[method-assign]
    return servicer


class CloakServer:
    """One server. Pass `models` (already loaded) or `loader` (called in a background thread; health says
    NOT_SERVING until it returns); with neither, the models come from config.models / config.device."""

    def __init__(self, config: ServerConfig, models: Models | None = None,
                 loader: Callable[[], Models] | None = None) -> None:
        config.check()
        self.config = config
        self.token = load_token(config.token_file) if config.token_file else None
        # --tokens-file: {token: name}, each name an identity (owner of its jobs, its own fair share)
        self.tokens = load_tokens(config.tokens_file) if config.tokens_file else None
        credentials = self.tokens or self.token
        self.auth = TokenInterceptor(credentials, self._count_reject) if credentials else None
        self.metrics = Metrics(config.device)
        self.scheduler = Scheduler(config, self.metrics, models)
        self.loader = loader
        if models is None and loader is None:
            from cloak import load_models

            self.loader = lambda: load_models(config.models, config.device, config.precision, config.compile)
        self.limits = pcm.Limits(max_seconds=config.max_seconds, max_upload_bytes=config.max_upload_bytes)
        # Thread pools (issue 16): open Protect/Attach streams each hold a thread for minutes, so they get a pool
        # sized to their caps; unary calls, health Check and reflection each have their own, so no number of
        # streams can keep health from answering.
        self.caps = StreamCaps(config.max_queue + config.max_batch + 8, config.max_attach, config.max_attach_per_job,
                               config.max_attach_per_client)
        self.stream_pool = ThreadPoolExecutor(max_workers=self.caps.threads, thread_name_prefix="cloak-stream")
        self.unary_pool = ThreadPoolExecutor(max_workers=UNARY_THREADS, thread_name_prefix="cloak-rpc")
        self.health_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cloak-health")
        self.reflection_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cloak-reflection")
        self.health = _pooled_health(self.health_pool)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.scheduler.on_state = self._on_state
        self.servicer = CloakServicer(self.scheduler, self.limits, config.device, self.caps,
                                      config.upload_idle_timeout,
                                      identify=self.auth.identify if self.auth is not None else None)
        self.servicer.bind_pool(self.stream_pool)
        self.server: grpc.Server | None = None
        self.loader_thread: threading.Thread | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.stopped = threading.Event()
        self.rejected_auth = 0
        self._reject_lock = threading.Lock()
        self._reject_log = logs.Throttle()

    def _on_state(self, state: ServingState) -> None:
        if state == ServingState.SERVING:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        elif state == ServingState.DRAINING:
            self.health.enter_graceful_shutdown()
        else:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _count_reject(self, method: str, peer: str) -> None:
        """A call with missing or wrong credentials: counted always, logged at most once per 10 s per peer host
        (and 5 lines/s in all) with how many were held back, so a flood cannot fill the disk with log."""
        with self._reject_lock:
            self.rejected_auth += 1
        held = self._reject_log.allow(peer_host(peer))
        if held is not None:
            logs.event("unauthenticated", level=30, method=method, peer=peer, suppressed=held)

    @property
    def address(self) -> str:
        """host:port to connect to (the listen host, or 127.0.0.1 for a wildcard listen address)."""
        listen = self.config.listen
        if listen.startswith("unix"):
            return listen
        host = listen.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Bind, start serving and (if needed) start loading the models. Returns the bound port."""
        cfg = self.config
        interceptors = [self.auth] if self.auth is not None else []
        # no maximum_concurrent_rpcs: gRPC would answer health with RESOURCE_EXHAUSTED too once it is reached;
        # the stream caps bound what holds a thread, and refusals take a spare thread for a moment
        server = grpc.server(self.unary_pool, interceptors=interceptors, options=SERVER_OPTIONS)
        pb_grpc.add_CloakServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        refl = reflection.ReflectionServicer((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME))
        info = refl.ServerReflectionInfo

        def reflection_info(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            return info(request_iterator, context)

        reflection_info.experimental_thread_pool = self.reflection_pool  # type: ignore[attr-defined]
        refl.ServerReflectionInfo = reflection_info  # type: ignore[method-assign]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(refl, server)
        try:
            if cfg.tls:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                port = server.add_secure_port(cfg.listen, creds)
            else:
                port = server.add_insecure_port(cfg.listen)
        except RuntimeError as e:
            raise ServerConfigError(f"cannot listen on {cfg.listen}: {e}") from e
        if not port and not cfg.listen.startswith("unix"):
            raise ServerConfigError(f"cannot listen on {cfg.listen} (address in use or not available)")
        self.port = port
        self.server = server
        server.start()
        self.scheduler.start()
        if self.scheduler.models is not None:
            self._on_state(ServingState.SERVING)
        else:
            assert self.loader is not None
            self.loader_thread = self.scheduler.load(self.loader)
        if cfg.metrics_port is not None:
            https = cfg.tls and not is_loopback(cfg.metrics_addr)  # a remote scraper gets the gRPC certificate
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_addr,
                                                        certfile=cfg.tls_cert if https else None,
                                                        keyfile=cfg.tls_key if https else None)
        logs.event("listening", listen=cfg.listen, port=port, tls=cfg.tls,
                   auth="named tokens" if self.tokens else "token" if self.token else False,
                   identities=sorted(self.tokens.values()) if self.tokens else None,
                   metrics_port=self.metrics_port, max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                   device=cfg.device)
        return port

    def wait_ready(self, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.scheduler.models is not None:
                return True
            if self.scheduler.load_error:
                return False
            time.sleep(0.05)
        return False

    def drain(self, timeout: float | None = None) -> None:
        """Graceful shutdown, step 1: health NOT_SERVING, no new jobs, running jobs finish (or end UNAVAILABLE
        after `timeout`, default --drain-timeout)."""
        self.scheduler.drain(self.config.drain_timeout if timeout is None else timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (after drain(), streams still sending results get `grace` seconds)."""
        self.scheduler.stop()
        if self.server is not None:
            self.server.stop(grace).wait()
        self.metrics.close()
        for pool in (self.stream_pool, self.unary_pool, self.health_pool, self.reflection_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.stopped.set()
        logs.event("stopped")


def serve(config: ServerConfig, ready: Callable[[CloakServer], Any] | None = None,
          stop_requested: threading.Event | None = None) -> int:
    """Run a server until SIGTERM/SIGINT (drain, then stop). Returns a process exit code. The signal handlers
    are installed first, so a signal at any moment (start-up, model loading, jobs running) drains and exits 0;
    `stop_requested` carries a signal that arrived even earlier (server.cli installs a handler before imports)."""
    logs.setup(config.log_format)
    stop_requested = stop_requested or threading.Event()
    signals = {"count": 0}
    holder: dict[str, CloakServer] = {}

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1 and "srv" in holder:
            logs.event("forced_stop", signal=signal.Signals(signum).name)
            holder["srv"].scheduler.stop()
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        config.check()
        if config.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ServerConfigError(f"--device {config.device}: CUDA is not available here")
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        srv = holder["srv"] = CloakServer(config)
        srv.start()
    except ServerConfigError as e:
        for sig, h in previous.items():
            signal.signal(sig, h)
        logs.event("config_error", level=40, error=str(e))
        print(f"cloak serve: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if ready is not None:
        ready(srv)
    try:
        while not stop_requested.wait(0.2):
            if srv.scheduler.load_error:
                srv.stop(grace=1.0)
                print(f"cloak serve: could not load the models: {srv.scheduler.load_error}", file=sys.stderr,
                      flush=True)
                return EXIT_BUNDLE
        logs.event("shutdown_requested")
        srv.drain()
        srv.stop(grace=max(5.0, config.drain_timeout / 4))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    busy = [t.name for t in (srv.loader_thread, srv.scheduler.thread) if t is not None and t.is_alive()]
    if busy:
        # SIGTERM while the models load (or a step outlived the drain): that thread is inside torch, and
        # interpreter shutdown under it aborted the process ("terminate called without an active exception",
        # SIGABRT). No job is left and the logs are flushed, so leave without tearing the interpreter down.
        logs.event("exit_with_busy_threads", threads=busy)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


__all__ = ["CloakServer", "serve", "BundleError"]
