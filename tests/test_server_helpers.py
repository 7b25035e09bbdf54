"""Shared helpers of the server tests (no tests here): tiny models, real servers on loopback, raw calls."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from conftest import corpus_clip, make_bundle, to_rate

from cloak import ProtectConfig, load_models
from server.app import CloakServer
from server.config import ServerConfig
from server.gen import cloak_service_pb2 as pb
from server.gen import cloak_service_pb2_grpc as pb_grpc

FAST = dict(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="male")
SERVING, NOT_SERVING = 1, 2  # grpc.health.v1.HealthCheckResponse.ServingStatus


def fast(**kw: Any) -> ProtectConfig:
    return ProtectConfig(**{**FAST, **kw})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for a module (the machine is shared; results stay reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread in a module that imports this fixture."""
    with one_thread():
        yield


@pytest.fixture(scope="module", name="models")
def models_fixture(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Any:
    """The tiny bundle's models, once per module that imports this fixture."""
    return bundle_models(tmp_path_factory.mktemp("server"))[0]


@pytest.fixture(scope="module", name="ch")
def ch_fixture(server: CloakServer) -> Iterator[grpc.Channel]:
    """A channel to the module's `server` fixture."""
    c = channel(server)
    yield c
    c.close()


def bundle_models(tmp: Path) -> tuple[Any, Path]:
    bundle = make_bundle(tmp / "bundle")
    # fp32: the server tests compare served audio with the engine's bit for bit (bf16 autocast, which precision
    # auto picks on CPUs with native bf16, rounds batched and unbatched convolutions differently; test_precision
    # covers it)
    return load_models(bundle, precision="fp32"), bundle


def speech(seconds: float = 1.0, rate: int = 16000, channels: int = 1, speaker: str = "vctk_p226",
           index: int = 0) -> np.ndarray:
    x, sr = corpus_clip(speaker, index, seconds=seconds)
    if sr != rate:
        x = to_rate(x, sr, rate)
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x * (1.0 - 0.2 * c) for c in range(channels)], 1).astype(np.float32)


@contextlib.contextmanager
def running(models: Any = None, loader: Callable[[], Any] | None = None, **cfg: Any) -> Iterator[CloakServer]:
    cfg.setdefault("listen", "127.0.0.1:0")
    srv = CloakServer(ServerConfig(**cfg), models=models, loader=loader)
    srv.start()
    try:
        yield srv
    finally:
        srv.drain(timeout=0)
        srv.stop(grace=0.5)


def channel(srv: CloakServer | str, **kw: Any) -> grpc.Channel:
    target = srv if isinstance(srv, str) else srv.address
    return grpc.insecure_channel(target, **kw)


def stub(ch: grpc.Channel) -> pb_grpc.CloakServiceStub:
    return pb_grpc.CloakServiceStub(ch)


def header(audio: np.ndarray, sr: int, settings: pb.ProtectSettings | None = None, encoding: str = "float32",
           **kw: Any) -> tuple[pb.ProtectHeader, bytes]:
    data = np.ascontiguousarray(audio, "<f4" if encoding == "float32" else "<i2").tobytes()
    h = pb.ProtectHeader(sample_rate=sr, channels=1 if audio.ndim == 1 else audio.shape[1], frames=audio.shape[0],
                         encoding=pb.SAMPLE_ENCODING_FLOAT32 if encoding == "float32" else pb.SAMPLE_ENCODING_INT16,
                         sha256=hashlib.sha256(data).hexdigest(), settings=settings or fast_settings(), **kw)
    return h, data


def fast_settings(**kw: Any) -> pb.ProtectSettings:
    from server.wire import config_to_settings

    return config_to_settings(fast(**kw))


def messages(h: pb.ProtectHeader | None, data: bytes, chunk: int = 65536) -> list[pb.ProtectRequest]:
    out = [pb.ProtectRequest(header=h)] if h is not None else []
    out += [pb.ProtectRequest(pcm=data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return out


def raw_protect(s: pb_grpc.CloakServiceStub, msgs: list[pb.ProtectRequest], metadata: Any = (),
                timeout: float = 60.0, stop_after: str | None = None) -> tuple[list[pb.JobEvent], grpc.StatusCode, str]:
    """Run a Protect call; returns (events, final code, details). stop_after='accepted' cancels the call once
    that event kind arrives (the job then is cancelled too)."""
    call = s.Protect(iter(msgs), metadata=metadata, timeout=timeout)
    events: list[pb.JobEvent] = []
    try:
        for r in call:
            events.append(r.event)
            if stop_after is not None and r.event.WhichOneof("kind") == stop_after:
                call.cancel()
                return events, grpc.StatusCode.CANCELLED, "cancelled by the test"
    except grpc.RpcError as e:
        return events, e.code(), e.details() or ""
    return events, grpc.StatusCode.OK, ""


def kinds(events: list[pb.JobEvent]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def result_audio(events: list[pb.JobEvent], shape: tuple[int, ...], encoding: str = "float32") -> np.ndarray:
    data = b"".join(e.result_chunk.pcm for e in events if e.WhichOneof("kind") == "result_chunk")
    done = next(e.done for e in events if e.WhichOneof("kind") == "done")
    assert hashlib.sha256(data).hexdigest() == done.sha256
    if encoding == "int16":
        return (np.frombuffer(data, "<i2").astype(np.float32) / 32768).reshape(shape)
    return np.frombuffer(data, "<f4").reshape(shape)


def long_job(s: pb_grpc.CloakServiceStub, seconds: float = 1.0, **kw: Any) -> tuple[Any, Iterator[Any], str | None]:
    """Start a job that runs for a long time; returns (call, its response iterator, job_id) once it is running."""
    audio = speech(seconds)
    h, data = header(audio, 16000, fast_settings(iterations=5000), **kw)
    call = s.Protect(iter(messages(h, data)))
    it = iter(call)
    job_id = None
    for r in it:
        job_id = r.event.job_id
        if r.event.WhichOneof("kind") == "progress":
            break
    return call, it, job_id


def bad_cases() -> list[tuple[str, list[pb.ProtectRequest], str]]:
    """Malformed Protect streams: (name, messages, what the INVALID_ARGUMENT details must contain)."""
    audio = speech(0.5)
    good_h, good = header(audio, 16000)

    def h(**kw):
        x = pb.ProtectHeader()
        x.CopyFrom(good_h)
        for k, v in kw.items():
            setattr(x, k, v)
        return x

    def with_settings(**kw):
        x = h()
        x.settings.CopyFrom(fast_settings())
        for k, v in kw.items():
            if isinstance(v, list):
                getattr(x.settings, k)[:] = v
            else:
                setattr(x.settings, k, v)
        return x

    nan = audio.copy()
    nan[100] = np.nan
    nan_h, nan_data = header(nan, 16000)
    nine = np.zeros((8000, 9), np.float32)
    nine_h, nine_data = header(nine, 16000)
    return [
        ("wrong sha", messages(h(sha256="0" * 64), good), "sha256 mismatch"),
        ("bad sha format", messages(h(sha256="xyz"), good), "header.sha256"),
        ("truncated stream", messages(good_h, good[:-400]), "truncated"),
        ("too much pcm", messages(good_h, good + b"\0\0\0\0"), "more PCM than the header declares"),
        ("zero frames", messages(h(frames=0), b""), "0 frames"),
        ("too short", messages(h(frames=10), good[:40]), "at least 0.1 s"),
        ("too long", messages(h(frames=16000 * 601), b""), "at most 600 s"),
        ("NaN samples", messages(nan_h, nan_data), "NaN"),
        ("9 channels", messages(nine_h, nine_data), "header.channels"),
        ("rate too low", messages(h(sample_rate=7999), good), "header.sample_rate"),
        ("rate too high", messages(h(sample_rate=192001), good), "header.sample_rate"),
        ("no encoding", messages(h(encoding=pb.SAMPLE_ENCODING_UNSPECIFIED), good), "header.encoding"),
        ("oversize chunk", [pb.ProtectRequest(header=h(frames=400_000, sha256="0" * 64)),
                            pb.ProtectRequest(pcm=b"\0" * ((1 << 20) + 4))], "at most 1048576"),
        ("no header", messages(None, good), "first message must be a ProtectHeader"),
        ("empty stream", [], "empty request stream"),
        ("two headers", [pb.ProtectRequest(header=good_h), pb.ProtectRequest(header=good_h)], "second ProtectHeader"),
        ("empty message", [pb.ProtectRequest(header=good_h), pb.ProtectRequest()], "empty message"),
        ("epsilon out of range", messages(with_settings(epsilon=0.5), good), "settings.epsilon"),
        ("step above epsilon", messages(with_settings(step_size=0.01), good), "settings.step_size"),
        ("iterations out of range", messages(with_settings(iterations=20000), good), "settings.iterations"),
        ("three weights", messages(with_settings(weights=[1.0, 2.0, 3.0]), good), "settings.weights"),
        ("negative weight", messages(with_settings(weights=[1.0, -2.0, 3.0, 4.0]), good), "settings.weights"),
        ("NaN window", messages(with_settings(window_seconds=float("nan")), good), "settings.window_seconds"),
        ("seed too big", messages(with_settings(seed=2**63), good), "settings.seed"),
        ("unknown gender", messages(with_settings(gender=17), good), "settings.gender"),
        ("unknown loss", messages(with_settings(losses=[9]), good), "settings.losses"),
        ("wavlm missing", messages(with_settings(id_encoders=[pb.SPEAKER_ENCODER_WAVLM]), good),
         "settings.id_encoders"),
    ]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout} s")


def health_status(ch: grpc.Channel, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def make_tls(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voicecloak test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def token_file(tmp: Path, token: str = "s3cret-token-0123456789", mode: int = 0o600) -> Path:
    p = tmp / "token"
    p.write_text(token + "\n")
    p.chmod(mode)
    return p
