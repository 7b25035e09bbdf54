"""VoiceCloak: protect voice recordings from diffusion voice cloning (VoiceCloak, arXiv 2505.12332)."""

from .audio import read_audio, write_audio
from .audio_checks import AudioError
from .bundle import BundleError, Models, load_models
from .config import ConfigError, ProtectConfig
from .jobs import Cancelled, CancelToken, Progress, ProtectResult
from .protect import protect

__version__ = "0.1.0"

__all__ = ["load_models", "protect", "ProtectConfig", "ProtectResult", "Progress", "CancelToken", "Cancelled",
           "Models", "BundleError", "ConfigError", "AudioError", "read_audio", "write_audio", "__version__"]
