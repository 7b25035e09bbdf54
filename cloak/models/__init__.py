"""Models: DiffVC (official layout), speaker encoders (GE2E, WavLM-SV, ECAPA-TDNN, the shipped black-box
verifier), HiFi-GAN V1."""

from .diffvc import OFFICIAL_CONFIG, DiffVC, DiffVCConfig, load_diffvc
from .ge2e import GE2E
from .speaker import SpeakerEncoder

__all__ = ["DiffVC", "DiffVCConfig", "OFFICIAL_CONFIG", "load_diffvc", "GE2E", "SpeakerEncoder"]
