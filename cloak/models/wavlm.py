"""WavLM speaker-verification embeddings (`transformers.WavLMForXVector`) from a local model directory in the
`microsoft/wavlm-base-plus-sv` layout (config.json, model weights, preprocessor_config.json). Differentiable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn


class WavLMSV(nn.Module):
    name = "wavlm"
    sample_rate = 16000

    def __init__(self, model: nn.Module, do_normalize: bool = True, checksum: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.do_normalize = do_normalize
        self.checksum = checksum

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> WavLMSV:
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"WavLM-SV model directory {directory} has no config.json")
        try:
            from transformers import WavLMForXVector
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("WavLM needs transformers: pip install 'voicecloak[wavlm]'") from e
        model = WavLMForXVector.from_pretrained(str(directory))
        do_norm = True
        pre = directory / "preprocessor_config.json"
        if pre.is_file():
            do_norm = bool(json.loads(pre.read_text()).get("do_normalize", True))
        h = hashlib.sha256()
        for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
            h.update(f.read_bytes())
        model.requires_grad_(False)
        return cls(model, do_norm, h.hexdigest()).to(device).eval()

    def embed(self, wave_16k: torch.Tensor) -> torch.Tensor:
        x = wave_16k if wave_16k.dim() == 2 else wave_16k.unsqueeze(0)
        if self.do_normalize:
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        emb = self.model(input_values=x).embeddings
        return torch.nn.functional.normalize(emb, dim=-1)
