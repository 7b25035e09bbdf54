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
from .pitch import f0_contour

BANK_DIR = Path(__file__).parent / "data" / "voicebank"


@dataclass
class BankSpeaker:
    name: str
    sex: str
    waves_22k: list[torch.Tensor]
    waves_16k: list[torch.Tensor]
    mels: list[torch.Tensor] = field(default_factory=list)
    pitch: tuple[torch.Tensor, torch.Tensor] | None = None  # (log-F0, voiced) of the concatenated mels, (T,) each


@dataclass
class SourceCrop:
    """A surrogate attacker source: log-mel (80, S) and its log-F0 contour and voicing (1, S) each."""

    mel: torch.Tensor
    log_f0: torch.Tensor | None = None
    voiced: torch.Tensor | None = None


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
        self.ge2e_bank = CentroidBank.load()

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

    def classify_sex(self, ge2e_emb: torch.Tensor, k: int = 15) -> str:
        """Sex of a speaker from its GE2E embedding: majority of the k nearest shipped centroids (cosine)."""
        bank = self.ge2e_bank
        sims = torch.nn.functional.cosine_similarity(ge2e_emb.float().cpu().reshape(1, -1), bank.centroids, dim=-1)
        top = sims.topk(min(k, len(bank.names))).indices.tolist()
        males = sum(bank.sexes[i] == "M" for i in top)
        return "M" if males * 2 > len(top) else "F"

    def source_crop(self, speaker: BankSpeaker, frames: int, gen: torch.Generator, pitch: bool = True) -> SourceCrop:
        """A `frames`-long crop of the speaker's concatenated utterances (tiled if they are shorter), with its
        F0 contour when `pitch` (measured on first use of the speaker). One draw from `gen` either way."""
        if pitch and speaker.pitch is None:
            contours = [f0_contour(w.numpy(), DIFFVC_RATE, m.shape[1]) for w, m in zip(speaker.waves_22k,
                                                                                         speaker.mels, strict=True)]
            speaker.pitch = (torch.from_numpy(np.concatenate([c[0] for c in contours])),
                             torch.from_numpy(np.concatenate([c[1] for c in contours])).float())
        # mel bins and the two contours as rows of one (82, T) array, tiled and cropped together
        rows = torch.cat([torch.cat(speaker.mels, 1), *([torch.stack(speaker.pitch)] if pitch else [])], 0)
        while rows.shape[1] < frames:
            rows = torch.cat([rows, rows], 1)
        start = int(torch.randint(0, rows.shape[1] - frames + 1, (1,), generator=gen))
        crop = rows[:, start:start + frames]
        n = speaker.mels[0].shape[0]
        return SourceCrop(crop[:n], crop[n:n + 1], crop[n + 1:]) if pitch else SourceCrop(crop)

CENTROIDS_FILE = Path(__file__).parent / "data" / "ge2e_centroids.npz"


@dataclass
class CentroidBank:
    """Precomputed GE2E speaker centroids with sex labels (embeddings only, no audio)."""

    names: list[str]
    sexes: list[str]
    centroids: torch.Tensor  # (S, 256), unit norm

    @classmethod
    def load(cls, path: Path = CENTROIDS_FILE) -> CentroidBank:
        if not path.is_file():
            raise FileNotFoundError(f"GE2E centroid bank missing: {path}")
        d = np.load(path)
        return cls([str(n) for n in d["names"]], [str(s) for s in d["sexes"]], torch.from_numpy(d["centroids"]))

    def of_sex(self, sex: str) -> list[int]:
        return [i for i, s in enumerate(self.sexes) if s == sex]


@torch.no_grad()
def build_centroids(root: str | Path, out: str | Path = CENTROIDS_FILE) -> Path:
    """GE2E centroid of every sex-labelled speaker under root (volume-normalised utterances, DiffVC's GE2E)."""
    from .models.ge2e import GE2E, volume_gain

    ge2e = GE2E.load()
    names, sexes, cents = [], [], []
    for spk in list_speakers(root):
        if spk.sex not in ("M", "F"):
            continue
        embs = []
        for f in spk.files:
            x, sr = sf.read(str(f), dtype="float32", always_2d=True)
            w16 = resample(torch.from_numpy(np.ascontiguousarray(x.mean(1))), sr, GE2E_RATE)
            embs.append(ge2e.embed(w16[None] * volume_gain(w16))[0])
        c = torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=0)
        names.append(spk.name)
        sexes.append(spk.sex)
        cents.append(c.numpy())
    out = Path(out)
    np.savez_compressed(out, names=np.array(names), sexes=np.array(sexes), centroids=np.stack(cents).astype(np.float32))
    return out


if __name__ == "__main__":
    import sys

    print(build_centroids(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpus-train"))
