"""DiffVC (Popov et al., ICLR 2022) with the official constructor, parameter names and sampler semantics.

`DiffVC(**OFFICIAL_CONFIG)` has exactly the 346 tensors of the released `vc_libritts_wodyn.pt` /
`vc_vctk_wodyn.pt` state dicts, so those load with strict=True. Unlike the official class nothing here is
wrapped in `torch.no_grad()`: the attack differentiates through `average_voice`, `diffused_reference`, `score`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .diffvc_decoder import Diffusion, ScoreInternals, pad_to_multiple
from .diffvc_encoder import FwdDiffusion


@dataclass(frozen=True)
class DiffVCConfig:
    """Constructor arguments in the official order (`DiffVC/params.py` values by default)."""

    n_feats: int = 80
    channels: int = 192
    filters: int = 768
    heads: int = 2
    layers: int = 6
    kernel: int = 3
    dropout: float = 0.1
    window_size: int = 4
    enc_dim: int = 128
    spk_dim: int = 128
    use_ref_t: bool = True
    dec_dim: int = 256
    beta_min: float = 0.05
    beta_max: float = 20.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffVCConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DiffVC config key(s): {sorted(unknown)}")
        return cls(**d)


OFFICIAL_CONFIG = DiffVCConfig()


def sequence_mask(lengths: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    max_length = int(lengths.max()) if max_length is None else max_length
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class DiffVC(nn.Module):
    def __init__(self, n_feats: int = 80, channels: int = 192, filters: int = 768, heads: int = 2,
                 layers: int = 6, kernel: int = 3, dropout: float = 0.1, window_size: int = 4,
                 enc_dim: int = 128, spk_dim: int = 128, use_ref_t: bool = True, dec_dim: int = 256,
                 beta_min: float = 0.05, beta_max: float = 20.0) -> None:
        super().__init__()
        self.config = DiffVCConfig(n_feats, channels, filters, heads, layers, kernel, dropout, window_size,
                                   enc_dim, spk_dim, use_ref_t, dec_dim, beta_min, beta_max)
        self.n_feats = n_feats
        self.encoder = FwdDiffusion(n_feats, channels, filters, heads, layers, kernel, dropout, window_size,
                                    enc_dim)
        self.decoder = Diffusion(n_feats, dec_dim, spk_dim, use_ref_t, beta_min, beta_max)

    @classmethod
    def from_config(cls, config: DiffVCConfig) -> DiffVC:
        return cls(**config.to_dict())

    # ---- the differentiable pieces the attack uses -------------------------------------------------------
    def average_voice(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder (MelEncoder + PostNet): mel (B, 80, T), mask (B, 1, T) -> prior mean (B, 80, T)."""
        return self.encoder(mel, mask)

    def diffused_reference(self, ref_mel: torch.Tensor, ref_mask: torch.Tensor, mean_ref: torch.Tensor,
                           t: float | torch.Tensor) -> torch.Tensor:
        """Official `compute_diffused_mean`: gamma(0,t)*ref + (1-gamma(0,t))*mean_ref, masked; t float or (B,)."""
        return self.decoder.compute_diffused_mean(ref_mel, ref_mask, mean_ref, t)

    def score(self, x_t: torch.Tensor, x_mask: torch.Tensor, mean: torch.Tensor, xt_ref: torch.Tensor,
              ref_mask: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
              return_internals: bool = False) -> torch.Tensor | tuple[torch.Tensor, ScoreInternals]:
        """The estimator s_theta(x_t, t | mean, xt_ref, c): x_t/mean (B, 80, T), x_mask (B, 1, T),
        xt_ref (B, 1, 80, T_ref), ref_mask (B, 1, T_ref), c (B, 256), t (B,). T is zero-padded to a multiple
        of 4 internally when needed (the official code requires it) and the result cropped back."""
        n = x_t.shape[-1]
        if n % 4:
            x_t, x_mask, mean = pad_to_multiple(x_t), pad_to_multiple(x_mask), pad_to_multiple(mean)
        out = self.decoder.estimator(x_t, x_mask, mean, xt_ref, ref_mask, c, t, return_internals)
        if return_internals:
            s, internals = out
            return s[..., :n], internals
        return out[..., :n]

    # ---- the official inference semantics ----------------------------------------------------------------
    @torch.no_grad()
    def convert(self, src_mel: torch.Tensor, src_lengths: torch.Tensor, ref_mel: torch.Tensor,
                ref_lengths: torch.Tensor, c: torch.Tensor, n_timesteps: int, mode: str = "ml",
                generator: torch.Generator | None = None, mean: torch.Tensor | None = None) -> torch.Tensor:
        """Official `DiffVC.forward`, returning the converted mel (B, 80, T_src). Noise is drawn from
        `generator` (global RNG when None) in the official order: start noise, then one draw per step.
        `mean`: a prior mean (B, 80, T_src) to use instead of the encoder's average voice of the source (a
        speaker-adaptive prior's output); None is the official behaviour."""
        if mode not in ("pf", "em", "ml"):
            raise ValueError(f"mode must be one of pf, em, ml; got {mode!r}")
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
        x_mask = sequence_mask(src_lengths, src_mel.shape[-1]).unsqueeze(1).to(src_mel.dtype)
        ref_mask = sequence_mask(ref_lengths, ref_mel.shape[-1]).unsqueeze(1).to(ref_mel.dtype)
        mean = self.average_voice(src_mel, x_mask) if mean is None else mean * x_mask
        mean_x = self.decoder.compute_diffused_mean(src_mel, x_mask, mean, 1.0)
        mean_ref = self.average_voice(ref_mel, ref_mask)
        b = src_mel.shape[0]
        max_len = int(src_lengths.max())
        new_len = max_len + (-max_len) % 4
        mask_new = sequence_mask(src_lengths, new_len).unsqueeze(1).to(src_mel.dtype)
        mean_new = src_mel.new_zeros((b, self.n_feats, new_len))
        mean_x_new = src_mel.new_zeros((b, self.n_feats, new_len))
        for i in range(b):
            n = int(src_lengths[i])
            mean_new[i, :, :n] = mean[i, :, :n]
            mean_x_new[i, :, :n] = mean_x[i, :, :n]
        z = mean_x_new + torch.randn(mean_x_new.shape, generator=generator, dtype=src_mel.dtype,
                                     device=src_mel.device)
        y = self.decoder.reverse_diffusion(z, mask_new, mean_new, ref_mel, ref_mask, mean_ref, c, n_timesteps,
                                           mode, generator)
        return y[:, :, :max_len]

    def compute_loss(self, x: torch.Tensor, x_mask: torch.Tensor, mean: torch.Tensor, x_ref: torch.Tensor,
                     mean_ref: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None,
                     offset: float = 1e-5) -> torch.Tensor:
        """Decoder training loss with precomputed encoder means (as the official training, t ~ U(offset, 1-offset))."""
        t = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device).clamp(offset, 1 - offset)
        return self.decoder.loss_t(x, x_mask, mean, x_ref, mean_ref, c, t, generator=generator)


def read_checkpoint(path: str) -> object:
    """A DiffVC checkpoint file as torch.load gives it (weights only, on the CPU); ValueError if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise ValueError(f"{path}: not a loadable DiffVC checkpoint ({e})") from e


def diffvc_from_checkpoint(obj: object, config: DiffVCConfig | None = None, device: str | torch.device = "cpu",
                           source: str = "checkpoint") -> DiffVC:
    """The DiffVC of a loaded checkpoint (`read_checkpoint`): an official state dict or a cloak checkpoint
    ({'config', 'state_dict'}), loaded strictly; `source` names it in errors."""
    if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        config = DiffVCConfig.from_dict(obj["config"]) if config is None else config
        state = obj["state_dict"]
    else:
        state = obj
        config = OFFICIAL_CONFIG if config is None else config
    model = DiffVC.from_config(config)
    try:
        model.load_state_dict(state, strict=True)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: state dict does not match DiffVC config {config}: {e}") from e
    return model.to(device).eval()


def load_diffvc(path: str, config: DiffVCConfig | None = None, device: str | torch.device = "cpu") -> DiffVC:
    """Load an official DiffVC state dict (`vc_*_wodyn.pt`) or a cloak checkpoint ({'config', 'state_dict'})."""
    return diffvc_from_checkpoint(read_checkpoint(path), config, device, source=path)
