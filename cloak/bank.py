"""The voice bank shipped in the package: a few sex-labelled speakers used for
opposite-gender identity centroids, the gender fallback classifier and surrogate attacker sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .corpus import list_speakers
from .features import DIFFVC_RATE, GE2E_RATE, diffvc_mel, resample
from .models.speaker import SpeakerEncoder

BANK_DIR = Path(__file__).parent / "data" / "voicebank"


@dataclass
class BankSpeaker:
    name: str
    sex: str
    waves_22k: list[torch.Tensor]
    waves_16k: list[torch.Tensor]
    mels: list[torch.Tensor] = field(default_factory=list)


class VoiceBank:
    def __init__(self, root: str | Path = BANK_DIR) -> None:
        self.root = Path(root)
        self.speakers: list[BankSpeaker] = []
        for spk in list_speakers(self.root):
            if spk.sex not in ("M", "F"):
                raise ValueError(f"voice bank speaker {spk.name} has no sex label in {self.root}/speakers.tsv")
            w22, w16 = [], []
            for f in spk.files:
                x, sr = sf.read(str(f), dtype="float32", always_2d=True)
                x = torch.from_numpy(np.ascontiguousarray(x.mean(1)))
                w22.append(resample(x, sr, DIFFVC_RATE))
                w16.append(resample(x, sr, GE2E_RATE))
            with torch.no_grad():
                mels = [diffvc_mel(w[None])[0] for w in w22]
            self.speakers.append(BankSpeaker(spk.name, spk.sex, w22, w16, mels))
        for sex in ("M", "F"):
            if not any(s.sex == sex for s in self.speakers):
                raise ValueError(f"voice bank {self.root} needs speakers of both sexes")
        self._centroids: dict[tuple[str, str], torch.Tensor] = {}

    def of_sex(self, sex: str) -> list[BankSpeaker]:
        return [s for s in self.speakers if s.sex == sex]

    @torch.no_grad()
    def centroid(self, encoder: SpeakerEncoder, speaker: BankSpeaker, device: torch.device) -> torch.Tensor:
        """L2-normalised mean of the normalised utterance embeddings of one speaker, (1, D)."""
        key = (encoder.name + (encoder.checksum or ""), speaker.name)
        if key not in self._centroids:
            embs = torch.cat([encoder.embed(w.to(device)[None]) for w in speaker.waves_16k])
            embs = torch.nn.functional.normalize(embs.float(), dim=-1).mean(0, keepdim=True)
            self._centroids[key] = torch.nn.functional.normalize(embs, dim=-1)
        return self._centroids[key].to(device)

    @torch.no_grad()
    def classify_sex(self, encoder: SpeakerEncoder, emb: torch.Tensor, device: torch.device) -> str:
        """Nearest of the two pooled sex centroids (cosine)."""
        scores = {}
        for sex in ("M", "F"):
            cents = torch.cat([self.centroid(encoder, s, device) for s in self.of_sex(sex)])
            pooled = torch.nn.functional.normalize(cents.mean(0, keepdim=True), dim=-1)
            scores[sex] = float(torch.nn.functional.cosine_similarity(emb.float(), pooled, dim=-1).mean())
        return max(scores, key=lambda k: scores[k])

    def source_mel(self, speaker: BankSpeaker, frames: int, gen: torch.Generator) -> torch.Tensor:
        """A (80, frames) crop of the speaker's concatenated utterances (tiled if they are shorter)."""
        mel = torch.cat(speaker.mels, 1)
        while mel.shape[1] < frames:
            mel = torch.cat([mel, mel], 1)
        start = int(torch.randint(0, mel.shape[1] - frames + 1, (1,), generator=gen))
        return mel[:, start:start + frames]
