"""The shipped black-box speaker verifier: a small ECAPA-TDNN trained on `shared/corpus-train` only.

GE2E is white-box for the cloak (the engine differentiates through it), so the identity figures it gives
overstate what a verifier the cloak never saw would measure. This verifier is that other one: a different
architecture (ECAPA-TDNN, `cloak.models.ecapa`, at reduced width: 1-D convolutions, SE-Res2Net blocks and
attentive statistics pooling, where GE2E is a 3-layer LSTM on 40 power-mel bins), trained here with an
additive-angular-margin softmax on speakers disjoint from every evaluation speaker (`cloak.train.verifier`), and
never used by the protection engine.

Input: 16 kHz mono waveform -> speechbrain-style log-mel filterbank (`cloak.models.ecapa.Fbank`: 25 ms Hamming
frames, 10 ms hop, dB, 80 dB floor, mean normalisation over the input) -> ECAPA-TDNN -> embedding, compared by
cosine. The acceptance threshold travels with the weights: the EER threshold on speakers of corpus-train held out
from training (see the checkpoint's `calibration` and cloak/data/VERIFIER_CARD.md).

Checkpoint format (`torch.save`, loaded with weights_only=True)::

    {"format": "voicecloak-verifier-1", "config": {...VerifierConfig}, "state_dict": {...},
     "calibration": {"threshold": float, "trial": str, "eer": float, ...}, "meta": {...}}

Loading is strict: an unknown format, a config that is not a VerifierConfig, or a state dict with a missing,
unexpected or mis-shaped key raises VerifierLoadError naming them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ecapa import ECAPA_TDNN, EcapaConfig, Fbank, FbankConfig

FORMAT = "voicecloak-verifier-1"
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "verifier.pt"
NAME = "verifier"


class VerifierLoadError(ValueError):
    """The file is not a verifier checkpoint this code can load exactly."""


@dataclass(frozen=True)
class VerifierConfig:
    """Front-end and ECAPA-TDNN sizes. Channels: 3 SE-Res2Net blocks of `channels`, aggregation of 3 x that."""

    n_mels: int = 80
    channels: int = 128
    res2net_scale: int = 8
    se_channels: int = 64
    attention_channels: int = 64
    embedding_dim: int = 192
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    dilations: tuple[int, ...] = (1, 2, 3, 4, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(int(v) for v in self.kernel_sizes))
        object.__setattr__(self, "dilations", tuple(int(v) for v in self.dilations))
        if len(self.kernel_sizes) != 5 or len(self.dilations) != 5:
            raise ValueError(f"kernel_sizes and dilations need 5 entries (first TDNN, 3 blocks, aggregation): {self}")
        for name in ("n_mels", "channels", "res2net_scale", "se_channels", "attention_channels", "embedding_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1: {self}")
        if self.channels % self.res2net_scale:
            raise ValueError(f"channels ({self.channels}) must be divisible by res2net_scale ({self.res2net_scale})")

    def ecapa(self) -> EcapaConfig:
        c = self.channels
        return EcapaConfig(input_size=self.n_mels, channels=(c, c, c, c, 3 * c), kernel_sizes=self.kernel_sizes,
                           dilations=self.dilations, attention_channels=self.attention_channels,
                           lin_neurons=self.embedding_dim, res2net_scale=self.res2net_scale,
                           se_channels=self.se_channels, global_context=True)

    def fbank(self) -> FbankConfig:
        return FbankConfig(n_mels=self.n_mels, mean_norm=True, std_norm=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kernel_sizes"] = list(self.kernel_sizes)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> VerifierConfig:
        if not isinstance(d, dict):
            raise VerifierLoadError(f"config must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise VerifierLoadError(f"config has unknown keys {unknown} (known: {sorted(names)})")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise VerifierLoadError(f"unusable config {d}: {e}") from e


class SpeakerVerifier(nn.Module):
    """Waveform (16 kHz) -> L2-normalised speaker embedding; the SpeakerEncoder interface (`embed`)."""

    name = NAME
    sample_rate = 16000

    def __init__(self, config: VerifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or VerifierConfig()
        self.fbank = Fbank(self.config.fbank())  # buffers not persistent: nothing of it is in the state dict
        self.model = ECAPA_TDNN(self.config.ecapa())
        self.checksum: str | None = None
        self.calibration: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}

    @property
    def threshold(self) -> float | None:
        """Cosine at or above which two recordings are accepted as one speaker (the shipped EER threshold)."""
        t = self.calibration.get("threshold")
        return None if t is None else float(t)

    @property
    def min_frames(self) -> int:
        """Fewest feature frames the reflect paddings of the network accept."""
        c = self.config
        return max(d * (k - 1) // 2 for k, d in zip(c.kernel_sizes, c.dilations, strict=True)) + 1

    def log_mel(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, frames, n_mels) dB log-mel, not normalised (what the training cache stores)."""
        x = wave_16k if wave_16k.dim() == 2 else wave_16k.unsqueeze(0)
        return self.fbank.log_mel(x)

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, frames, n_mels) un-normalised dB log-mel -> (B, embedding_dim) raw embeddings."""
        if feats.shape[1] < self.min_frames:
            raise ValueError(f"the verifier needs at least {self.min_frames} frames "
                             f"({(self.min_frames - 1) * self.fbank.cfg.hop_length} samples), got {feats.shape[1]}")
        return self.model(self.fbank.normalize(feats)).squeeze(1)

    def forward(self, wave_16k: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.log_mel(wave_16k))

    def embed(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, N) or (N,) 16 kHz waveform -> (B, embedding_dim) L2-normalised embeddings (differentiable)."""
        return F.normalize(self.forward(wave_16k).float(), dim=-1)


def checkpoint(model: SpeakerVerifier, calibration: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The shipped file's content: fp32 weights, config, calibration and provenance."""
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in model.state_dict().items()}
    return {"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, "calibration": calibration,
            "meta": meta}


def _problems(expected: dict[str, torch.Tensor], state: dict[str, Any]) -> list[str]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape))
    not_tensors = sorted(k for k in expected if k in state and not isinstance(state[k], torch.Tensor))
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                        ("non-tensor entries", not_tensors)):
        if keys:
            parts.append(f"{label} {keys[:10]}" + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""))
    return parts


def load_verifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> SpeakerVerifier:
    """Load a verifier checkpoint (None: the one shipped in the package), strict; frozen, eval mode, fp32.
    Raises FileNotFoundError for a missing file, VerifierLoadError for anything that does not match exactly."""
    p = DEFAULT_PATH if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"speaker verifier weights not found: {p}")
    blob = p.read_bytes()
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise VerifierLoadError(f"{p}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict):
        raise VerifierLoadError(f"{p}: expected a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") != FORMAT:
        raise VerifierLoadError(f"{p}: format {ckpt.get('format')!r}, expected {FORMAT!r}")
    for key in ("config", "state_dict", "calibration", "meta"):
        if key not in ckpt:
            raise VerifierLoadError(f"{p}: no {key!r} entry")
    config = VerifierConfig.from_dict(ckpt["config"])
    model = SpeakerVerifier(config)
    state = ckpt["state_dict"]
    if not isinstance(state, dict):
        raise VerifierLoadError(f"{p}: state_dict must be a dict, got {type(state).__name__}")
    problems = _problems(model.state_dict(), state)
    if problems:
        raise VerifierLoadError(f"{p} does not match SpeakerVerifier({config}): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    calibration = ckpt["calibration"]
    if not isinstance(calibration, dict) or not isinstance(calibration.get("threshold"), float):
        raise VerifierLoadError(f"{p}: calibration must be a dict with a float 'threshold'")
    model.calibration = dict(calibration)
    model.meta = dict(ckpt["meta"]) if isinstance(ckpt["meta"], dict) else {}
    model.checksum = hashlib.sha256(blob).hexdigest()
    model.requires_grad_(False)
    return model.to(device).eval()


__all__ = ["DEFAULT_PATH", "FORMAT", "NAME", "SpeakerVerifier", "VerifierConfig", "VerifierLoadError", "checkpoint",
           "load_verifier"]
