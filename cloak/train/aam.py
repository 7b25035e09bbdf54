"""The additive angular margin softmax (AAM, ArcFace) head speaker encoders are trained with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AAMSoftmax(torch.nn.Module):
    """Additive angular margin softmax (ArcFace): logits s * cos(theta + m) for the true class, s * cos(theta)
    for the others."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_classes, dim))
        torch.nn.init.xavier_normal_(self.weight)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, scale: float, margin: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = torch.cos(torch.acos(cos.gather(1, labels[:, None])) + margin)
        logits = scale * cos.scatter(1, labels[:, None], target)
        loss = F.cross_entropy(logits, labels)
        acc = (cos.argmax(1) == labels).float().mean()
        return loss, acc
