"""DiffVC's "average voice" encoder: MelEncoder (conv prenet + relative-position Transformer) and PostNet.

Parameter names follow `DiffVC/model/encoder.py` and `postnet.py` of huawei-noah/Speech-Backbones so that
official checkpoints load with strict=True. Written from the architecture description, not copied.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x)  # x * tanh(softplus(x)) in one kernel; autograd keeps only x (less activation memory)


class LayerNorm(nn.Module):
    """Channel LayerNorm over dim 1 with eps 1e-4 (parameters `gamma`, `beta`)."""

    def __init__(self, channels: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.gamma.view(*shape) + self.beta.view(*shape)


class ConvReluNorm(nn.Module):
    def __init__(self, in_channels: int, hidden: int, out_channels: int, kernel_size: int, n_layers: int,
                 p_dropout: float) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.conv_layers = nn.ModuleList()
        self.norm_layers = nn.ModuleList()
        for i in range(n_layers):
            self.conv_layers.append(nn.Conv1d(in_channels if i == 0 else hidden, hidden, kernel_size,
                                              padding=kernel_size // 2))
            self.norm_layers.append(LayerNorm(hidden))
        self.relu_drop = nn.Sequential(nn.ReLU(), nn.Dropout(p_dropout))
        self.proj = nn.Conv1d(hidden, out_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, norm in zip(self.conv_layers, self.norm_layers, strict=True):
            h = self.relu_drop(norm(conv(h * mask)))
        return (x + self.proj(h)) * mask


class MultiHeadAttention(nn.Module):
    """Self-attention with shared relative-position key/value embeddings inside a window."""

    def __init__(self, channels: int, out_channels: int, n_heads: int, window_size: int | None = None,
                 p_dropout: float = 0.0) -> None:
        super().__init__()
        assert channels % n_heads == 0
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        if window_size is not None:
            std = self.k_channels**-0.5
            self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)
            self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * std)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.xavier_uniform_(conv.weight)

    def _offsets(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the relative embedding for each (i, j) and whether |j - i| <= window."""
        w = self.window_size or 0
        pos = torch.arange(t, device=device)
        rel = pos[None, :] - pos[:, None]
        valid = rel.abs() <= w
        return (rel.clamp(-w, w) + w), valid

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, d, t = x.shape
        h, k = self.n_heads, self.k_channels
        q = self.conv_q(x).view(b, h, k, t).transpose(2, 3)
        key = self.conv_k(x).view(b, h, k, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, k, t).transpose(2, 3)
        scale = 1.0 / math.sqrt(k)
        scores = torch.matmul(q, key.transpose(-2, -1)) * scale
        if self.window_size is not None:
            idx, valid = self._offsets(t, x.device)
            rel_logits = torch.matmul(q, self.emb_rel_k.transpose(-2, -1).unsqueeze(0))  # (b, h, t, 2w+1)
            gathered = rel_logits.gather(-1, idx.expand(b, h, t, t))
            scores = scores + torch.where(valid, gathered, torch.zeros_like(gathered)) * scale
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = self.drop(F.softmax(scores, dim=-1))
        out = torch.matmul(p, v)
        if self.window_size is not None:
            w = self.window_size
            # weight of each relative offset r: p[i, i + r] (zero outside the sequence)
            pos = torch.arange(t, device=x.device)
            cols = pos[:, None] + torch.arange(-w, w + 1, device=x.device)[None, :]
            inside = (cols >= 0) & (cols < t)
            rel_w = p.gather(-1, cols.clamp(0, t - 1).expand(b, h, t, 2 * w + 1))
            rel_w = torch.where(inside, rel_w, torch.zeros_like(rel_w))
            out = out + torch.matmul(rel_w, self.emb_rel_v.unsqueeze(0))
        out = out.transpose(2, 3).reshape(b, d, t)
        return self.conv_o(out)


class FFN(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 p_dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.drop = nn.Dropout(p_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.conv_1(x * mask)))
        return self.conv_2(x * mask) * mask


class Encoder(nn.Module):
    def __init__(self, hidden: int, filters: int, n_heads: int, n_layers: int, kernel_size: int,
                 p_dropout: float, window_size: int | None) -> None:
        super().__init__()
        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList()
        self.norm_layers_1 = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        self.norm_layers_2 = nn.ModuleList()
        for _ in range(n_layers):
            self.attn_layers.append(MultiHeadAttention(hidden, hidden, n_heads, window_size, p_dropout))
            self.norm_layers_1.append(LayerNorm(hidden))
            self.ffn_layers.append(FFN(hidden, hidden, filters, kernel_size, p_dropout))
            self.norm_layers_2.append(LayerNorm(hidden))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2,
                                     strict=True):
            x = x * mask
            x = n1(x + self.drop(attn(x, attn_mask)))
            x = n2(x + self.drop(ffn(x, mask)))
        return x * mask


class MelEncoder(nn.Module):
    def __init__(self, n_feats: int, channels: int, filters: int, heads: int, layers: int, kernel: int,
                 dropout: float, window_size: int | None = None) -> None:
        super().__init__()
        self.init_proj = nn.Conv1d(n_feats, channels, 1)
        # the official prenet's dropout is fixed at 0.5 whatever `dropout` says
        self.prenet = ConvReluNorm(channels, channels, channels, kernel_size=5, n_layers=3, p_dropout=0.5)
        self.encoder = Encoder(channels, filters, heads, layers, kernel, dropout, window_size)
        self.term_proj = nn.Conv1d(channels, n_feats, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.init_proj(x * mask)
        x = self.prenet(x, mask)
        x = self.encoder(x, mask)
        return self.term_proj(x * mask)


class PostBlock(nn.Module):
    def __init__(self, dim: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3), nn.GroupNorm(groups, dim), Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class PostResnetBlock(nn.Module):
    def __init__(self, dim: int, groups: int = 8) -> None:
        super().__init__()
        self.block1 = PostBlock(dim, groups)
        self.block2 = PostBlock(dim, groups)
        self.res = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.res(x * mask) + self.block2(self.block1(x, mask), mask)


class PostNet(nn.Module):
    """2-D refinement of the encoder mel: (B, 80, T) -> (B, 80, T)."""

    def __init__(self, dim: int, groups: int = 8) -> None:
        super().__init__()
        self.init_conv = nn.Conv2d(1, dim, 1)
        self.res_block = PostResnetBlock(dim, groups)
        self.final_conv = nn.Conv2d(dim, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        mask = mask.unsqueeze(1)
        x = self.res_block(self.init_conv(x * mask), mask)
        return self.final_conv(x * mask).squeeze(1)


class FwdDiffusion(nn.Module):
    """The encoder as DiffVC holds it: `encoder` (MelEncoder) + `postnet` (PostNet)."""

    def __init__(self, n_feats: int, channels: int, filters: int, heads: int, layers: int, kernel: int,
                 dropout: float, window_size: int | None, dim: int) -> None:
        super().__init__()
        self.n_feats = n_feats
        self.encoder = MelEncoder(n_feats, channels, filters, heads, layers, kernel, dropout, window_size)
        self.postnet = PostNet(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.postnet(self.encoder(x, mask), mask)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self(x, mask)
        return torch.sum((out - y).pow(2) * mask) / (torch.sum(mask) * self.n_feats)
