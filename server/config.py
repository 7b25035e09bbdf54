"""Server settings (`cloak serve` flags) and the checks made before anything listens."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
MAX_CHUNK_BYTES = 1 << 20  # largest PCM chunk accepted (and sent) in one message
# largest gRPC message received: room above a chunk, so that an oversize chunk gets INVALID_ARGUMENT naming "pcm";
# beyond it gRPC itself answers RESOURCE_EXHAUSTED (without status details: not to be retried)
MAX_MESSAGE_BYTES = 4 * MAX_CHUNK_BYTES
MIN_SECONDS = 0.1  # shortest clip the engine protects


class ServerConfigError(ValueError):
    """A server flag is wrong or unsafe; the message says which and what to do."""


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    models: str | None = None  # bundle directory; None = CLOAK_MODELS, then the embedded cloak-mini
    device: str = "cpu"
    precision: str = "auto"  # U-Net arithmetic: auto (bf16 on CUDA and native-bf16 CPUs), fp32, bf16
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
    upload_idle_timeout: float = 20.0  # an upload that sends no PCM bytes this long ends DEADLINE_EXCEEDED
    max_attach_per_job: int = 4  # open Attach streams on one job
    max_attach_per_client: int = 8  # open Attach streams of one identity
    max_attach: int = 64  # open Attach streams in all (each holds a stream thread)
    tokens_file: str | None = None  # named tokens, one "NAME TOKEN" per line
    memory_budget: int | None = None  # bytes for uploads + running jobs; None = half the physical memory

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
        if self.token_file and self.tokens_file:
            raise ServerConfigError("--token-file and --tokens-file exclude each other (put the one token in the "
                                    "tokens file under a name)")
        if self.token_file:
            load_token(self.token_file)
        if self.tokens_file:
            load_tokens(self.tokens_file)
        if not 0 < self.upload_idle_timeout <= 3600:
            raise ServerConfigError(f"--upload-idle-timeout must be in (0, 3600] s, got {self.upload_idle_timeout}")
        for flag, v in (("--max-attach-per-job", self.max_attach_per_job),
                        ("--max-attach-per-client", self.max_attach_per_client), ("--max-attach", self.max_attach)):
            if not 1 <= v <= 10_000:
                raise ServerConfigError(f"{flag} must be in [1, 10000], got {v}")
        if self.memory_budget is not None and self.memory_budget < 16 << 20:
            raise ServerConfigError(f"--memory-budget must be at least 16MiB, got {self.memory_budget} bytes")
        if self.metrics_port is not None and not is_loopback(self.metrics_addr) and not self.tls \
                and not self.insecure:
            raise ServerConfigError(
                f"refusing to serve metrics on {self.metrics_addr} without TLS: anyone on the network could read "
                "them. Pass --tls-cert/--tls-key (metrics then use HTTPS with the same certificate), use a "
                "loopback --metrics-addr, or add --insecure")

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget if self.memory_budget is not None else physical_memory() // 2


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


def physical_memory() -> int:
    """Bytes of physical memory (the cgroup limit when one is lower), 8 GiB when unknown."""
    total = 8 << 30
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and 0 < int(v) < total:
            total = int(v)
    return total


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of '1073741824', '512MiB', '8GiB', '2GB', '1.5 GiB' (KiB/MiB/GiB/TiB binary, KB/MB/GB/TB decimal)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ServerConfigError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 8GiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[unit])


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def load_tokens(path: str | os.PathLike[str], check_mode: bool = True) -> dict[str, str]:
    """{token: name} of a tokens file: one "NAME TOKEN" per line ('#' comments and blank lines ignored), names
    [A-Za-z0-9._@-] up to 64 characters, tokens as for --token-file; names and tokens unique; mode 0600."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ServerConfigError(f"tokens file {p}: {e.strerror or e}") from e
    if check_mode and os.name == "posix" and st.st_mode & 0o077:
        raise ServerConfigError(f"tokens file {p} is accessible by other users (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}")
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
            raise ServerConfigError(f"tokens file {p} line {n}: expected 'NAME TOKEN' with a name of letters, "
                                    "digits and ._@- (up to 64)")
        name, token = parts
        if not token.isprintable() or len(token) < 16:
            raise ServerConfigError(f"tokens file {p} line {n}: the token of {name!r} is too short (at least 16 "
                                    "printable characters)")
        if token in out:
            raise ServerConfigError(f"tokens file {p} line {n}: {name!r} has the same token as {out[token]!r}")
        if name in out.values():
            raise ServerConfigError(f"tokens file {p} line {n}: the name {name!r} appears twice")
        out[token] = name
    if not out:
        raise ServerConfigError(f"tokens file {p} holds no 'NAME TOKEN' line")
    return out


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
