"""A small typed client for a VoiceCloak server (cloak.v1), used by `cloak protect --server`.

    from clients.remote import RemoteProtector
    with RemoteProtector("127.0.0.1:50051", token="...") as rp:
        result = rp.protect(audio, 48000, ProtectConfig(seed=0), progress=print)
        result.audio, result.metrics, result.job_id

Targets are anything gRPC resolves: "host:port", "dns:///name:port" (every A/AAAA record a backend) or
"ipv4:127.0.0.1:5001,127.0.0.1:5002" (a fixed list). The channel balances round_robin over all backends and
skips those whose grpc.health.v1 status is not SERVING (client-side health checking). Job ids belong to the
replica that accepted the job: attach/cancel/job try the backends in turn until one knows the id.

Errors: bad audio -> cloak.AudioError, bad settings -> cloak.ConfigError (as local protection raises them),
cancellation -> cloak.Cancelled, anything about reaching or being admitted by the server -> ServerUnavailable,
other server-side failures -> RemoteError. grpcio is imported only when a RemoteProtector is made.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloak import AudioError, Cancelled, CancelToken, ConfigError, Progress, ProtectConfig
from cloak.audio import validate_samples

CHUNK_BYTES = 64 * 1024  # upload chunk size (grpc/grpc#11299: 16-64 KiB chunks stream best); the server takes <= 1 MiB
SERVICE = "cloak.v1.CloakService"


class RemoteError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, code: str, details: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after


class ServerUnavailable(RemoteError):
    """The server cannot be reached, refused the credentials, is full or draining, or the deadline passed."""


@dataclass
class RemoteResult:
    audio: np.ndarray  # float32, the input's shape
    sample_rate: int
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""
    sha256: str = ""  # of the output PCM as sent


@dataclass(frozen=True)
class ModelDescription:
    name: str
    sha256: str
    device: str
    dtype: str


@dataclass(frozen=True)
class ServerInfo:
    version: str
    state: str
    models: list[ModelDescription]
    limits: dict[str, float]
    queue_depth: int
    active_jobs: int
    device: str
    defaults: ProtectConfig


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED
    queue_position: int
    fraction: float
    error: str
    expires_in_seconds: float


def read_token(path: str | Path) -> str:
    token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def service_config(health_check: bool = True) -> str:
    cfg: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": SERVICE, "method": m} for m in ("GetServerInfo", "GetJob")],
            "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    }
    if health_check:
        cfg["healthCheckConfig"] = {"serviceName": SERVICE}
    return json.dumps(cfg)


class RemoteProtector:
    """Protect recordings on a VoiceCloak server (or several, load-balanced)."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None, *,
                 tls: bool | None = None, server_name: str | None = None, health_check: bool = True,
                 chunk_bytes: int = CHUNK_BYTES, client_name: str = "",
                 options: list[tuple[str, Any]] | None = None) -> None:
        import grpc

        from server import wire
        from server.gen import cloak_service_pb2 as pb
        from server.gen import cloak_service_pb2_grpc as pb_grpc

        self._grpc, self._pb, self._wire = grpc, pb, wire
        self.target = target
        self.chunk_bytes = int(chunk_bytes)
        self.client_name = client_name
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts: list[tuple[str, Any]] = [
            ("grpc.service_config", service_config(health_check)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            *(options or []),
        ]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or (tls is None and tls_ca is not None):
            ca = Path(tls_ca).expanduser().read_bytes() if tls_ca is not None else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.stub = pb_grpc.CloakServiceStub(self.channel)

    # --- plumbing -----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RemoteProtector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _error(self, e: Any) -> Exception:
        """Map a grpc.RpcError to the exception callers expect."""
        grpc = self._grpc
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else str(e)) or code.name
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ConfigError(details) if details.startswith("settings") else AudioError(details)
        if code == grpc.StatusCode.CANCELLED:
            return Cancelled(details)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ServerUnavailable(code.name, details, retry_after_seconds(e))
        return RemoteError(code.name, details)

    def _by_id(self, call: Callable[..., Any], request: Any, tries: int, timeout: float | None) -> Any:
        """A job-id RPC, retried on NOT_FOUND: with several replicas each try may reach another backend."""
        grpc = self._grpc
        last: Any = None
        for _ in range(max(1, tries)):
            try:
                return call(request, metadata=self._metadata, timeout=timeout)
            except grpc.RpcError as e:
                last = e
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise self._error(e) from e
        raise RemoteError("NOT_FOUND", last.details() if last is not None else "job not found")

    # --- API ------------------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until a backend is connected (not necessarily SERVING); raises ServerUnavailable."""
        try:
            self._grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except self._grpc.FutureTimeoutError as e:
            raise ServerUnavailable("UNAVAILABLE", f"no server reachable at {self.target} in {timeout:g} s") from e

    def info(self, timeout: float | None = 10.0) -> ServerInfo:
        pb = self._pb
        try:
            r = self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self._metadata, timeout=timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from e
        lim = r.limits
        limits = {f.name: getattr(lim, f.name) for f in lim.DESCRIPTOR.fields}
        return ServerInfo(
            version=r.version, state=pb.ServingState.Name(r.state).removeprefix("SERVING_STATE_"),
            models=[ModelDescription(m.name, m.sha256, m.device, m.dtype) for m in r.models], limits=limits,
            queue_depth=r.queue_depth, active_jobs=r.active_jobs, device=r.device,
            defaults=self._wire.settings_to_config(r.defaults))

    def cancel(self, job_id: str, tries: int = 8, timeout: float | None = 10.0) -> str:
        r = self._by_id(self.stub.Cancel, self._pb.CancelRequest(job_id=job_id), tries, timeout)
        return self._pb.JobState.Name(r.state).removeprefix("JOB_STATE_")

    def job(self, job_id: str, tries: int = 8, timeout: float | None = 10.0) -> JobStatus:
        s = self._by_id(self.stub.GetJob, self._pb.GetJobRequest(job_id=job_id), tries, timeout).status
        return JobStatus(s.job_id, self._pb.JobState.Name(s.state).removeprefix("JOB_STATE_"), s.queue_position,
                         s.fraction, s.error, s.expires_in_seconds)

    def protect(self, audio: np.ndarray, sample_rate: int, config: ProtectConfig | None = None,
                progress: Callable[[Progress], None] | None = None, cancel: CancelToken | None = None, *,
                encoding: str | None = None, timeout: float | None = None, keep_on_disconnect: bool = True,
                reattach_tries: int = 3, busy_retries: int = 0,
                on_event: Callable[[Any], None] | None = None) -> RemoteResult:
        """Protect a clip on the server, like cloak.protect (same shapes, float32 out).

        encoding: 'float32' or 'int16' on the wire (default: int16 for int16 arrays, else float32; int16 output
        is quantised within epsilon). When the stream drops after the job was accepted, the job is re-attached
        by id up to `reattach_tries` times (the server keeps it running with keep_on_disconnect). A full queue is
        retried `busy_retries` times after the server's RetryInfo delay (a RESOURCE_EXHAUSTED without RetryInfo, a
        message over a size limit, is not). `cancel` stops the job on the server.
        """
        grpc, pb = self._grpc, self._pb
        config = config or ProtectConfig()
        arr = np.asarray(audio)
        if encoding is None:
            encoding = "int16" if arr.dtype == np.int16 else "float32"
        if encoding not in ("float32", "int16"):
            raise ConfigError(f"encoding must be float32 or int16, got {encoding!r}")
        samples = validate_samples(arr, sample_rate, name="audio")
        wire_encoding = self._wire.ENCODING_ENUM[encoding]
        data = self._wire.encode(samples, wire_encoding)  # int16 input: exactly its own samples
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        header = pb.ProtectHeader(
            sample_rate=sample_rate, channels=channels, frames=samples.shape[0],
            encoding=wire_encoding, sha256=hashlib.sha256(data).hexdigest(),
            settings=self._wire.config_to_settings(config),
            keep_on_disconnect=keep_on_disconnect, client_name=self.client_name)

        def requests() -> Iterator[Any]:
            yield pb.ProtectRequest(header=header)
            view = memoryview(data)
            for off in range(0, len(data), self.chunk_bytes):
                yield pb.ProtectRequest(pcm=bytes(view[off:off + self.chunk_bytes]))

        state = _Follow(samples.shape, channels, sample_rate, progress, on_event)
        attempt = 0
        while True:
            call = self.stub.Protect(requests(), metadata=self._metadata, timeout=timeout)
            try:
                return self._run(call, state, cancel)
            except grpc.RpcError as e:
                err = self._error(e)
                # only a RetryInfo means "busy, try again": a RESOURCE_EXHAUSTED without one is gRPC's own
                # message-size limit, which the same request hits again
                if (isinstance(err, ServerUnavailable) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        and err.retry_after is not None and state.job_id is None and attempt < busy_retries):
                    attempt += 1
                    time.sleep(min(60.0, err.retry_after))
                    continue
                if (state.job_id and keep_on_disconnect and e.code() == grpc.StatusCode.UNAVAILABLE
                        and reattach_tries > 0):
                    return self._reattach(state, cancel, reattach_tries, timeout, err)
                raise err from e

    def attach(self, job_id: str, progress: Callable[[Progress], None] | None = None,
               cancel: CancelToken | None = None, timeout: float | None = None, tries: int = 8,
               on_event: Callable[[Any], None] | None = None) -> RemoteResult:
        """Follow a running or finished job by id to its result (after a dropped connection)."""
        state = _Follow(None, None, None, progress, on_event)
        state.job_id = job_id
        return self._attach(state, cancel, timeout, tries)

    def _attach(self, state: _Follow, cancel: CancelToken | None, timeout: float | None, tries: int) -> RemoteResult:
        grpc, pb = self._grpc, self._pb
        last: Exception | None = None
        for _ in range(max(1, tries)):
            call = self.stub.Attach(pb.AttachRequest(job_id=state.job_id), metadata=self._metadata, timeout=timeout)
            try:
                return self._run(call, state, cancel)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise self._error(e) from e
                last = RemoteError("NOT_FOUND", e.details())
        assert last is not None
        raise last

    def _reattach(self, state: _Follow, cancel: CancelToken | None, tries: int, timeout: float | None,
                  first: Exception) -> RemoteResult:
        grpc = self._grpc
        for i in range(tries):
            time.sleep(min(5.0, 0.5 * 2**i))
            try:
                return self._attach(state, cancel, timeout, tries=8)
            except ServerUnavailable as e:
                if e.code != grpc.StatusCode.UNAVAILABLE.name:
                    raise
        raise first

    def _run(self, call: Any, state: _Follow, cancel: CancelToken | None) -> RemoteResult:
        stop = threading.Event()
        watcher = None
        if cancel is not None:
            def watch() -> None:
                while not stop.wait(0.05):
                    if cancel.cancelled:
                        if state.job_id:
                            try:
                                self.cancel(state.job_id, tries=2, timeout=5.0)
                            except Exception:  # noqa: BLE001 - the stream is cancelled below anyway
                                pass
                        call.cancel()
                        return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        try:
            for response in call:
                result = state.feed(response.event, self._wire)
                if result is not None:
                    return result
            raise RemoteError("INTERNAL", "the server ended the stream without a result")
        except self._grpc.RpcError:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("protection cancelled") from None
            raise
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=1.0)


class _Follow:
    """Folds a job's event stream into a result (survives re-attach: chunks are placed by offset)."""

    def __init__(self, shape: tuple[int, ...] | None, channels: int | None, sample_rate: int | None,
                 progress: Callable[[Progress], None] | None, on_event: Callable[[Any], None] | None) -> None:
        self.shape, self.channels, self.sample_rate = shape, channels, sample_rate
        self.progress, self.on_event = progress, on_event
        self.job_id: str | None = None
        self.buf = bytearray()

    def feed(self, ev: Any, wire: Any) -> RemoteResult | None:
        if self.on_event is not None:
            self.on_event(ev)
        kind = ev.WhichOneof("kind")
        if ev.job_id:
            self.job_id = ev.job_id
        if kind == "accepted":
            a = ev.accepted
            self.sample_rate, self.channels = a.sample_rate, a.channels
            if self.shape is None:
                self.shape = (a.frames,) if a.channels == 1 else (a.frames, a.channels)
            self.buf = bytearray()
        elif kind == "progress" and self.progress is not None:
            p = ev.progress
            self.progress(Progress(p.window, p.windows, p.iteration, p.iterations, dict(p.losses), p.elapsed_seconds,
                                   p.eta_seconds))
        elif kind == "result_chunk":
            c = ev.result_chunk
            if c.offset != len(self.buf):
                if c.offset > len(self.buf):
                    raise RemoteError("DATA_LOSS", f"result chunk at byte {c.offset}, expected {len(self.buf)}")
                del self.buf[c.offset:]  # a re-attach sends the result again from the start
            self.buf += c.pcm
        elif kind == "done":
            d = ev.done
            data = bytes(self.buf)
            digest = hashlib.sha256(data).hexdigest()
            if digest != d.sha256:
                raise RemoteError("DATA_LOSS", f"result sha256 {digest} does not match the server's {d.sha256}")
            assert self.shape is not None and self.sample_rate is not None
            audio = wire.decode(data, d.encoding, 1).reshape(self.shape)
            return RemoteResult(audio, int(self.sample_rate), _metrics_dict(d.metrics, wire), self.job_id or "",
                                d.sha256)
        return None


def _metrics_dict(m: Any, wire: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "snr_db": m.snr_db, "linf": m.linf, "losses_start": dict(m.losses_start), "losses_end": dict(m.losses_end),
        "iterations": m.iterations, "windows": m.windows, "seconds": m.seconds, "queued_seconds": m.queued_seconds,
        "gender": m.gender, "opposite_speaker": m.opposite_speaker, "model": m.model,
    }
    if m.warning:  # the output is not protected (linf 0): no SNR to report
        out["warning"] = m.warning
        out["snr_db"] = None
    if m.HasField("settings"):
        out["config"] = wire.settings_to_config(m.settings).to_dict()
    if m.details_json:
        details = json.loads(m.details_json)
        out["history"] = details.get("history")
        out["masking_exponents"] = details.get("masking_exponents")
        out["predicted_pesq"] = details.get("predicted_pesq")
    return out


def retry_after_seconds(e: Any) -> float | None:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED status, if the server sent one."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        st = rpc_status.from_call(e)
    except Exception:  # noqa: BLE001 - no details, or grpcio-status missing
        return None
    if st is None:
        return None
    for d in st.details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None
