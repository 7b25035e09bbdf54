"""DiffVC's score estimator (U-Net `GradLogPEstimator`) and the SDE it belongs to (`Diffusion`).

Parameter names follow `DiffVC/model/diffusion.py` and `modules.py` (huawei-noah/Speech-Backbones) so that
official checkpoints load with strict=True. The forward can also return the six LinearAttention context
matrices and the up-path features, computed in the same pass (no hooks, no module state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .diffvc_encoder import Mish

ATTN_KEYS: tuple[str, ...] = ("downs.0.2", "downs.1.2", "downs.2.2", "mid_attn", "ups.0.2", "ups.1.2")
DOWN_ATTN_KEYS: tuple[str, ...] = ("downs.0.2", "downs.1.2", "downs.2.2")
UP_FEATURE_KEYS: tuple[str, ...] = ("ups.0", "ups.1")


class Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t_emb)[:, :, None, None]
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class LinearAttention(nn.Module):
    """Linear attention over the flattened (freq x time) map; 4 heads x 32 channels, softmax on k over positions.

    Returns the output and the context matrix C[b, h, d, e] = sum_n softmax_n(k)[b,h,d,n] * v[b,h,e,n].
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # channels-last activations: memory is (b, h, w, c), so the 1x1 convolutions are plain matmuls on a
            # view and the head split needs no copy (same arithmetic as below, in the memory's order)
            hidden = self.heads * self.dim_head
            qkv = F.linear(x.permute(0, 2, 3, 1), self.to_qkv.weight.view(3 * hidden, -1))
            q, k, v = qkv.reshape(b, h * w, 3, self.heads, self.dim_head).unbind(2)
            k = k.softmax(dim=1)
            context = torch.einsum("bnhd,bnhe->bhde", k, v)
            out = torch.einsum("bhde,bnhd->bnhe", context, q).reshape(b, h, w, hidden)
            out = F.linear(out, self.to_out.weight.view(self.to_out.out_channels, hidden), self.to_out.bias)
            return out.permute(0, 3, 1, 2), context
        qkv = self.to_qkv(x)
        qkv = qkv.reshape(b, 3, self.heads, self.dim_head, h * w)
        q, k, v = qkv.unbind(1)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w)), context


class Rezero(nn.Module):
    def __init__(self, fn: LinearAttention) -> None:
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))


class Residual(nn.Module):
    """x + g * attention(x); returns the context too."""

    def __init__(self, fn: Rezero) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, context = self.fn.fn(x)
        return x + out * self.fn.g, context


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Grad-TTS time embedding of 1000*t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = 1000.0 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1).to(t.dtype)


class RefBlock(nn.Module):
    """Encodes the diffused reference mel (B, 1, 80, T_ref) into one (B, out_dim) vector."""

    def __init__(self, out_dim: int, time_emb_dim: int) -> None:
        super().__init__()
        base = out_dim // 4
        self.mlp1 = nn.Sequential(Mish(), nn.Linear(time_emb_dim, base))
        self.mlp2 = nn.Sequential(Mish(), nn.Linear(time_emb_dim, 2 * base))

        def glu_conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.InstanceNorm2d(cout, affine=True), nn.GLU(dim=1))

        self.block11 = glu_conv(1, 2 * base)
        self.block12 = glu_conv(base, 2 * base)
        self.block21 = glu_conv(base, 4 * base)
        self.block22 = glu_conv(2 * base, 4 * base)
        self.block31 = glu_conv(2 * base, 8 * base)
        self.block32 = glu_conv(4 * base, 8 * base)
        self.final_conv = nn.Conv2d(4 * base, out_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        y = self.block12(self.block11(x * mask) * mask)
        y = y + self.mlp1(t_emb)[:, :, None, None]
        y = self.block22(self.block21(y * mask) * mask)
        y = y + self.mlp2(t_emb)[:, :, None, None]
        y = self.block32(self.block31(y * mask) * mask)
        y = self.final_conv(y * mask)
        return (y * mask).sum((2, 3)) / (mask.sum((2, 3)) * x.shape[2])


@dataclass
class ScoreInternals:
    """What one estimator pass exposes besides the score."""

    contexts: dict[str, torch.Tensor]  # (B, 4, 32, 32) per attention block, keys ATTN_KEYS
    features: dict[str, torch.Tensor]  # up-path block outputs after their Upsample, keys UP_FEATURE_KEYS


class GradLogPEstimator(nn.Module):
    def __init__(self, dim_base: int, dim_cond: int, use_ref_t: bool, dim_mults: tuple[int, ...] = (1, 2, 4),
                 spk_emb_dim: int = 256) -> None:
        super().__init__()
        self.dim_base = dim_base
        self.use_ref_t = use_ref_t
        dims = [2 + dim_cond, *(dim_base * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        self.mlp = nn.Sequential(nn.Linear(dim_base, dim_base * 4), Mish(), nn.Linear(dim_base * 4, dim_base))
        cond_total = dim_base + spk_emb_dim
        if use_ref_t:
            self.ref_block = RefBlock(out_dim=dim_cond, time_emb_dim=dim_base)
            cond_total += dim_cond
        self.cond_block = nn.Sequential(nn.Linear(cond_total, 4 * dim_cond), Mish(),
                                        nn.Linear(4 * dim_cond, dim_cond))
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, (din, dout) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(din, dout, dim_base),
                ResnetBlock(dout, dout, dim_base),
                Residual(Rezero(LinearAttention(dout))),
                nn.Identity() if last else Downsample(dout),
            ]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, dim_base)
        self.mid_attn = Residual(Rezero(LinearAttention(mid)))
        self.mid_block2 = ResnetBlock(mid, mid, dim_base)
        for din, dout in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                ResnetBlock(dout * 2, din, dim_base),
                ResnetBlock(din, din, dim_base),
                Residual(Rezero(LinearAttention(din))),
                Upsample(din),
            ]))
        self.final_block = Block(dim_base, dim_base)
        self.final_conv = nn.Conv2d(dim_base, 1, 1)

    def condition(self, xt_ref: torch.Tensor, ref_mask: torch.Tensor, c: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(time embedding after the MLP, condition vector (B, dim_cond))."""
        pos = sinusoidal_embedding(t, self.dim_base)
        t_emb = self.mlp(pos)
        parts = [pos]
        if self.use_ref_t:
            parts.append(self.ref_block(xt_ref, ref_mask.unsqueeze(1), t_emb))
        parts.append(c)
        return t_emb, self.cond_block(torch.cat(parts, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, mean: torch.Tensor, xt_ref: torch.Tensor,
                ref_mask: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                return_internals: bool = False) -> torch.Tensor | tuple[torch.Tensor, ScoreInternals]:
        t_emb, cond = self.condition(xt_ref, ref_mask, c, t)
        h = torch.stack([mean, x], 1)
        mask = x_mask.unsqueeze(1)
        cond = cond[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        h = torch.cat([h, cond], 1)
        if self.final_conv.weight.is_contiguous(memory_format=torch.channels_last) and h.shape[2] > 1:
            h = h.contiguous(memory_format=torch.channels_last)  # match channels-last weights: no per-conv copies
        contexts: dict[str, torch.Tensor] = {}
        features: dict[str, torch.Tensor] = {}
        hiddens = []
        masks = [mask]
        for i, (res1, res2, attn, down) in enumerate(self.downs):
            m = masks[-1]
            h = res2(res1(h, m, t_emb), m, t_emb)
            h, contexts[f"downs.{i}.2"] = attn(h)
            hiddens.append(h)
            h = down(h * m)
            masks.append(m[:, :, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        h = self.mid_block1(h, m, t_emb)
        h, contexts["mid_attn"] = self.mid_attn(h)
        h = self.mid_block2(h, m, t_emb)
        for i, (res1, res2, attn, up) in enumerate(self.ups):
            m = masks.pop()
            h = torch.cat((h, hiddens.pop()), dim=1)
            h = res2(res1(h, m, t_emb), m, t_emb)
            h, contexts[f"ups.{i}.2"] = attn(h)
            h = up(h * m)
            features[f"ups.{i}"] = h
        h = self.final_block(h, mask)
        out = (self.final_conv(h * mask) * mask).squeeze(1)
        if return_internals:
            return out, ScoreInternals(contexts, features)
        return out


class Diffusion(nn.Module):
    """The decoder: the score estimator plus the SDE schedule (beta_t = beta_min + (beta_max - beta_min) t)."""

    def __init__(self, n_feats: int, dim_unet: int, dim_spk: int, use_ref_t: bool, beta_min: float,
                 beta_max: float) -> None:
        super().__init__()
        self.estimator = GradLogPEstimator(dim_unet, dim_spk, use_ref_t)
        self.n_feats = n_feats
        self.beta_min = beta_min
        self.beta_max = beta_max

    def get_beta(self, t: float) -> float:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def get_gamma(self, s: float | torch.Tensor, t: float | torch.Tensor, p: float = 1.0):
        """exp(-p/2 * integral_s^t beta); tensors broadcast as (B, 1, 1)."""
        integral = (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (t + s)) * (t - s)
        if isinstance(integral, torch.Tensor):
            return torch.exp(-0.5 * p * integral)[..., None, None] if integral.dim() == 1 else \
                torch.exp(-0.5 * p * integral)
        return math.exp(-0.5 * p * integral)

    def get_mu(self, s: float, t: float) -> float:
        return self.get_gamma(s, t) * (1.0 - self.get_gamma(0, s, 2.0)) / (1.0 - self.get_gamma(0, t, 2.0))

    def get_nu(self, s: float, t: float) -> float:
        return self.get_gamma(0, s) * (1.0 - self.get_gamma(s, t, 2.0)) / (1.0 - self.get_gamma(0, t, 2.0))

    def get_sigma(self, s: float, t: float) -> float:
        a = 1.0 - self.get_gamma(0, s, 2.0)
        b = 1.0 - self.get_gamma(s, t, 2.0)
        c = 1.0 - self.get_gamma(0, t, 2.0)
        return math.sqrt(a * b / c)

    def compute_diffused_mean(self, x0: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
                              t: float | torch.Tensor) -> torch.Tensor:
        w = self.get_gamma(0, t)
        return (x0 * w + mean * (1.0 - w)) * mask

    def variance(self, t: float | torch.Tensor):
        return 1.0 - self.get_gamma(0, t, 2.0)

    def reverse_diffusion(self, z: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, ref: torch.Tensor,
                          ref_mask: torch.Tensor, mean_ref: torch.Tensor, c: torch.Tensor, n_timesteps: int,
                          mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
        h = 1.0 / n_timesteps
        xt = z * mask
        for i in range(n_timesteps):
            t = 1.0 - i * h
            time = torch.full((z.shape[0],), t, dtype=z.dtype, device=z.device)
            beta_t = self.get_beta(t)
            xt_ref = self.compute_diffused_mean(ref, ref_mask, mean_ref, t).unsqueeze(1)
            score = self.estimator(xt, mask, mean, xt_ref, ref_mask, c, time)
            if mode == "pf":
                dxt = 0.5 * (mean - xt - score) * (beta_t * h)
            else:
                if mode == "ml":
                    kappa = self.get_gamma(0, t - h) * (1.0 - self.get_gamma(t - h, t, 2.0))
                    kappa = kappa / (self.get_gamma(0, t) * beta_t * h) - 1.0
                    omega = self.get_nu(t - h, t) / self.get_gamma(0, t) + self.get_mu(t - h, t)
                    omega -= 0.5 * beta_t * h + 1.0
                    sigma = self.get_sigma(t - h, t)
                else:
                    kappa, omega, sigma = 0.0, 0.0, math.sqrt(beta_t * h)
                dxt = (mean - xt) * (0.5 * beta_t * h + omega)
                dxt = dxt - score * (1.0 + kappa) * (beta_t * h)
                noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
                dxt = dxt + noise * sigma
            xt = (xt - dxt) * mask
        return xt

    def loss_t(self, x0: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, x_ref: torch.Tensor,
               mean_ref: torch.Tensor, c: torch.Tensor, t: torch.Tensor, ref_mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
               spectrum_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Score-matching loss at times t (B,), as the official training: masked mean of (s*sqrt(var) + z)^2.
        `weight` (B,) scales each sample's share (None = the official loss; all ones gives the same value).
        `spectrum_weight` (B,) adds, per sample, that weight times the mean over mel bins of the squared time-mean
        of the error (s*sqrt(var) + z): with the weight var/gamma^2 this is the squared error of the long-term
        spectrum of the x_0 the score implies, in nats^2, the part of the error that only the speaker conditioning
        can remove at large t. A linear functional of the same error, so the optimum (the true score) is the same."""
        ref_mask = mask if ref_mask is None else ref_mask
        xt_mean = self.compute_diffused_mean(x0, mask, mean, t)
        var = self.variance(t)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        xt = (xt_mean + z * torch.sqrt(var)) * mask
        z = z * mask
        xt_ref = self.compute_diffused_mean(x_ref, ref_mask, mean_ref, t).unsqueeze(1)
        est = self.estimator(xt, mask, mean, xt_ref, ref_mask, c, t) * torch.sqrt(var)
        diff = (est + z) * mask
        err = diff**2
        if weight is not None:
            err = err * weight.to(err.dtype).view(-1, *([1] * (err.dim() - 1)))
        loss = torch.sum(err) / (torch.sum(mask) * self.n_feats)
        if spectrum_weight is not None:
            frames = mask.sum(-1).clamp(min=1.0)  # (B, 1)
            spectrum_err = (diff.sum(-1) / frames).pow(2).mean(-1)  # (B,)
            loss = loss + (spectrum_err * spectrum_weight.to(diff.dtype)).mean()
        return loss


def pad_to_multiple(x: torch.Tensor, multiple: int = 4) -> torch.Tensor:
    """Zero-pad the last axis up to a multiple (the U-Net halves time twice)."""
    extra = (-x.shape[-1]) % multiple
    return F.pad(x, (0, extra)) if extra else x
