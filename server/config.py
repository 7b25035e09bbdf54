"""Server settings (`cloak serve` flags) and the checks made before anything listens."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
MAX_CHUNK_BYTES = 1 << 20  # largest PCM chunk accepted (and sent) in one message
MIN_SECONDS = 0.1  # shortest clip the engine protects


class ServerConfigError(ValueError):
    """A server flag is wrong or unsafe; the message says which and what to do."""


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    models: str | None = None  # bundle directory; None = CLOAK_MODELS, then the embedded cloak-mini
    device: str = "cpu"
    precision: str = "auto"  # U-Net arithmetic: auto (bf16 on CUDA), fp32, bf16
    compile: bool = False  # torch.compile the U-Net
    max_queue: int = 16  # jobs waiting (uploading or queued) beyond the running ones
    max_batch: int = 4  # jobs stepped together; 1 = no cross-job batching
    max_seconds: float = 600.0  # longest clip accepted
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    insecure: bool = False  # allow a non-loopback address without TLS
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    result_ttl: float = 600.0  # seconds a finished job (and its result) stays attachable
    max_results: int = 64  # finished jobs kept at most (oldest dropped first)
    max_result_mb: float = 4096.0  # bytes of kept results at most
    max_upload_mb: float = 1024.0  # largest upload (PCM bytes) of one job
    drain_timeout: float = 60.0  # on SIGTERM: how long running jobs may take to finish
    threads: int | None = None  # torch CPU threads
    log_format: str = "json"  # json | text

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def check(self) -> None:
        """Raise ServerConfigError for unusable or unsafe settings (before any model is loaded)."""
        if self.max_queue < 1:
            raise ServerConfigError(f"--max-queue must be >= 1, got {self.max_queue}")
        if not 1 <= self.max_batch <= 256:
            raise ServerConfigError(f"--max-batch must be in [1, 256], got {self.max_batch}")
        if not 0 < self.max_seconds <= 24 * 3600:
            raise ServerConfigError(f"--max-seconds must be in (0, 86400], got {self.max_seconds}")
        if self.result_ttl < 0 or self.drain_timeout < 0:
            raise ServerConfigError("--result-ttl and --drain-timeout must be >= 0")
        if self.max_upload_mb <= 0 or self.max_result_mb <= 0 or self.max_results < 1:
            raise ServerConfigError("--max-upload-mb, --max-result-mb and --max-results must be positive")
        if self.threads is not None and self.threads < 1:
            raise ServerConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.log_format not in ("json", "text"):
            raise ServerConfigError(f"--log-format must be json or text, got {self.log_format!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServerConfigError("--tls-cert and --tls-key go together")
        for name, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise ServerConfigError(f"{name}: no such file: {path}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ServerConfigError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        host, _ = split_listen(self.listen)
        if not self.tls and not is_loopback(host) and not self.insecure:
            raise ServerConfigError(
                f"refusing to listen on {self.listen} without TLS: audio and tokens would cross the network in "
                "clear text. Pass --tls-cert/--tls-key, listen on a loopback address, or add --insecure")
        if self.token_file:
            load_token(self.token_file)


def split_listen(listen: str) -> tuple[str, int | None]:
    """('host', port) of a listen address: 'H:P', '[v6]:P', 'unix:PATH' (host 'unix', port None)."""
    if listen.startswith("unix:") or listen.startswith("unix-abstract:"):
        return "unix", None
    if listen.startswith("["):
        host, _, rest = listen[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = listen.rpartition(":")
        if not sep:
            raise ServerConfigError(f"--listen must be HOST:PORT, [IPV6]:PORT or unix:PATH, got {listen!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ServerConfigError(f"--listen {listen!r}: the port must be a number in [0, 65535]")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for Unix sockets, localhost and 127.0.0.0/8 / ::1; False for wildcard and other addresses."""
    if host in ("unix", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def load_token(path: str | os.PathLike[str], check_mode: bool = True) -> str:
    """The bearer token in a file; with check_mode the file must not be accessible by group or others."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ServerConfigError(f"token file {p}: {e.strerror or e}") from e
    if check_mode and os.name == "posix" and st.st_mode & 0o077:
        raise ServerConfigError(f"token file {p} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                                f"run: chmod 600 {p}")
    token = text.strip()
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise ServerConfigError(f"token file {p} must hold one token: printable characters without spaces")
    if len(token) < 16:
        raise ServerConfigError(f"token file {p}: the token is too short ({len(token)} characters, at least 16)")
    return token
