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
