"""The building blocks of speechbrain's ECAPA_TDNN (`speechbrain/lobes/models/ECAPA_TDNN.py`) in plain torch: TDNN,
Res2Net, squeeze-excitation and SE-Res2Net blocks and attentive statistics pooling. Module and attribute names are
speechbrain's (its Conv1d / BatchNorm1d wrappers keep the torch module under `.conv` / `.norm`), so a speechbrain
state dict loads with strict=True; where each fact was read is listed in cloak.models.ecapa, which assembles them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpeechbrainConv1d(nn.Module):
    """speechbrain Conv1d (skip_transpose): 'same' output length, reflect padding; weights under `.conv`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad, self.pad), mode="reflect")
        return self.conv(x)


class SpeechbrainBatchNorm1d(nn.Module):
    """speechbrain BatchNorm1d (skip_transpose); the torch module under `.norm`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def _time_mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, L) float mask of the valid frames; `lengths` are relative (1.0 = the whole tensor)."""
    L = x.shape[-1]
    if lengths is None:
        return torch.ones(x.shape[0], 1, L, dtype=x.dtype, device=x.device)
    idx = torch.arange(L, device=x.device, dtype=x.dtype)
    return (idx[None, :] < (lengths.to(x) * L)[:, None]).to(x.dtype).unsqueeze(1)


class TDNNBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = SpeechbrainConv1d(in_channels, out_channels, kernel_size, dilation, groups)
        self.norm = SpeechbrainBatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.conv(x)))


class Res2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int = 8, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels ({channels}) must be divisible by res2net_scale ({scale})")
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        y: torch.Tensor | None = None
        for i, chunk in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y = chunk
            elif i == 1:
                y = self.blocks[0](chunk)
            else:
                assert y is not None
                y = self.blocks[i - 1](chunk + y)
            outs.append(y)
        return torch.cat(outs, dim=1)


class SEBlock(nn.Module):
    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = SpeechbrainConv1d(channels, se_channels, 1)
        self.conv2 = SpeechbrainConv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            s = x.mean(dim=2, keepdim=True)
        else:
            m = _time_mask(x, lengths)
            s = (x * m).sum(dim=2, keepdim=True) / m.sum(dim=2, keepdim=True)
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(s))))
        return s * x


class SERes2NetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, res2net_scale: int, se_channels: int,
                 kernel_size: int, dilation: int, groups: int = 1) -> None:
        super().__init__()
        self.tdnn1 = TDNNBlock(in_channels, out_channels, 1, 1, groups)
        self.res2net_block = Res2NetBlock(out_channels, res2net_scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(out_channels, out_channels, 1, 1, groups)
        self.se_block = SEBlock(out_channels, se_channels)
        self.shortcut = SpeechbrainConv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        residual = self.shortcut(x) if self.shortcut is not None else x
        x = self.tdnn2(self.res2net_block(self.tdnn1(x)))
        return self.se_block(x, lengths) + residual


class AttentiveStatisticsPooling(nn.Module):
    eps = 1e-12

    def __init__(self, channels: int, attention_channels: int = 128, global_context: bool = True) -> None:
        super().__init__()
        self.global_context = global_context
        self.tdnn = TDNNBlock(channels * 3 if global_context else channels, attention_channels, 1, 1)
        self.conv = SpeechbrainConv1d(attention_channels, channels, 1)

    def _stats(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (w * x).sum(dim=2)
        std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2).clamp(self.eps))
        return mean, std

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        L = x.shape[-1]
        mask = _time_mask(x, lengths)
        if self.global_context:
            mean, std = self._stats(x, mask / mask.sum(dim=2, keepdim=True))
            attn = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, L), std.unsqueeze(2).expand(-1, -1, L)], dim=1)
        else:
            attn = x
        attn = self.conv(torch.tanh(self.tdnn(attn)))
        attn = attn.masked_fill(mask == 0, float("-inf"))
        mean, std = self._stats(x, F.softmax(attn, dim=2))
        return torch.cat((mean, std), dim=1).unsqueeze(2)
