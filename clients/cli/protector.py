"""One way to get a protector: `make_protector` picks local protection (the models loaded here) or a VoiceCloak
server (remote mode: --server / CLOAK_SERVER, flags from `add_remote_args`) and returns an object with the same
`protect` call for both. `cloak protect`, `cloak audacity` and `cloak evaluate` (local only) get theirs here.

    protector = make_protector(settings, resolve_remote_target(args), say=print)
    result = protector.protect(samples, sample_rate, settings.config, progress=..., cancel=token)
    result.audio, result.metrics; protector.device, protector.model_ids (for the report)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import numpy as np

import cloak
from cloak import BundleError, CancelToken, Progress, ProtectConfig

from .common import ENV_SERVER, ENV_TOKEN_FILE, UsageError
from .settings import RemoteTarget, Settings, load_models_for

ProgressFn = Callable[[Progress], None]


class Protected(Protocol):
    """What a protection returns, locally (cloak.ProtectResult) or remotely (clients.remote.RemoteResult)."""

    audio: np.ndarray
    sample_rate: int
    metrics: dict[str, Any]


class Protector(Protocol):
    """Cloaks one recording; `device` and `model_ids` say where and with what (for the per-file report)."""

    device: str  # "cpu", "cuda[:N]", or "remote:<the server's device>"
    model_ids: list[dict[str, Any]]  # [{"name": ..., "sha256": ...}] of the models that protect

    def protect(self, audio: np.ndarray, sample_rate: int, config: ProtectConfig, *,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Protected: ...


@dataclass
class LocalProtector:
    """Protection in this process with models loaded here (cloak.protect)."""

    models: cloak.Models
    device: str
    model_ids: list[dict[str, Any]] = field(default_factory=list)

    def protect(self, audio: np.ndarray, sample_rate: int, config: ProtectConfig, *,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Protected:
        # looked up on the module at each call: tests replace cloak.protect with a fake engine
        return cloak.protect(audio, sample_rate, self.models, config, progress=progress, cancel=cancel)


@dataclass
class ServerProtector:
    """Protection on a VoiceCloak server through clients.remote.RemoteProtector."""

    client: Any  # clients.remote.RemoteProtector (grpcio is imported only when one is made)
    server: str
    device: str
    model_ids: list[dict[str, Any]] = field(default_factory=list)

    def protect(self, audio: np.ndarray, sample_rate: int, config: ProtectConfig, *,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Protected:
        result: Protected = self.client.protect(audio, sample_rate, config, progress=progress, cancel=cancel)
        return result


def add_remote_args(p: argparse.ArgumentParser) -> None:
    """--server, --token-file, --tls-ca: the flags resolve_remote_target reads (remote mode)."""
    remote = p.add_argument_group("remote mode (cloak on a `cloak serve` server; models/device flags are ignored)")
    remote.add_argument("--server", metavar="TARGET",
                        help=f"cloak on a VoiceCloak server: HOST:PORT, dns:///NAME:PORT or ipv4:A:P,B:P "
                             f"(round-robin over healthy servers) (env {ENV_SERVER})")
    remote.add_argument("--token-file", metavar="FILE", help=f"bearer token for the server (env {ENV_TOKEN_FILE})")
    remote.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the server with (enables TLS)")


def remote_protector(target: RemoteTarget) -> Any:
    """A clients.remote.RemoteProtector for the target. UsageError (exit 2) when the remote client (grpcio, the
    server extra) is missing or the token / --tls-ca file cannot be read; ConfigError (exit 2) for an empty
    token file."""
    hint = "remote mode needs the server extra (pip install 'voicecloak[server]')"
    try:
        from ..remote import RemoteProtector, read_token
    except ImportError as e:
        raise UsageError(f"{hint}: {e}") from e
    try:
        token = read_token(target.token_file) if target.token_file else None
    except OSError as e:
        raise UsageError(f"token file {target.token_file}: {e}") from e
    try:
        return RemoteProtector(target.server, token=token, tls_ca=target.tls_ca)
    except ImportError as e:  # grpcio is imported when the client is made
        raise UsageError(f"{hint}: {e}") from e
    except OSError as e:
        raise UsageError(f"--tls-ca {target.tls_ca}: {e}") from e


@overload
def make_protector(settings: Settings, remote: None, say: Callable[[str], None] | None = None) -> LocalProtector: ...


@overload
def make_protector(settings: Settings, remote: RemoteTarget | None,
                   say: Callable[[str], None] | None = None) -> Protector: ...


def make_protector(settings: Settings, remote: RemoteTarget | None,
                   say: Callable[[str], None] | None = None) -> Protector:
    """The protector for these settings: on the server when a remote target is given (its info is asked for at
    once, so an unreachable server fails here: ServerUnavailable), else the models the settings name, loaded
    here (BundleError on any problem, also when id_encoders asks for a WavLM the bundle lacks). `say` gets
    one progress line ("loading models ...", "protecting on ...")."""
    say = say or (lambda msg: None)
    if remote is not None:
        client = remote_protector(remote)
        info = client.info()
        say(f"cloak: protecting on {remote.server} (voicecloak {info.version}, {info.device})")
        return ServerProtector(client, remote.server, f"remote:{info.device}",
                               [{"name": m.name, "sha256": m.sha256} for m in info.models])
    say(f"cloak: loading models ({settings.models or 'embedded'}) on {settings.device}")
    models = load_models_for(settings)
    if "wavlm" in settings.config.id_encoders and models.wavlm is None:
        raise BundleError("id_encoders asks for 'wavlm' but the model bundle has no wavlm-sv/ directory")
    return LocalProtector(models, settings.device, [{"name": i.name, "sha256": i.sha256} for i in models.info])
