"""Robustness transforms: what may happen to a published (cloaked) recording before an attacker clones from it.

Every transform maps mono float32 audio at rate `sr` to audio of the same length and rate, sample-aligned:

    mp3_128, mp3_64, mp3_32   MP3 (LAME via lameenc, CBR, quality 2) decoded back by libsndfile; the decoder delay
                              (LAME's 576 + 529 samples, not removed by libsndfile) is found by cross-correlation
                              and cut, the tail padding trimmed
    resample_16k              to 16 kHz and back (polyphase, Kaiser window); an identity for 16 kHz input
    lowpass_4k                8th-order Butterworth low-pass at 4 kHz, zero-phase (sosfiltfilt)
    noise_30db                white Gaussian noise at 30 dB SNR (relative to the clip's power), seeded
    denoise                   noisereduce spectral gating (non-stationary, prop_decrease 1): a speech-enhancement
                              purification, the cheapest of the purifiers the literature uses
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..mp3 import fit_length, mp3_roundtrip
from .metrics import to_rate


@dataclass(frozen=True)
class Transform:
    name: str
    description: str
    fn: Callable[[np.ndarray, int, int], np.ndarray]  # (audio, sr, seed) -> audio

    def __call__(self, audio: np.ndarray, sr: int, seed: int = 0) -> np.ndarray:
        x = np.asarray(audio, np.float32)
        if x.ndim != 1:
            raise ValueError(f"{self.name}: expected mono audio (frames,), got shape {x.shape}")
        y = np.asarray(self.fn(x, int(sr), int(seed)), np.float32)
        y = fit_length(y, x.size)
        return np.clip(np.nan_to_num(y), -1.0, 1.0).astype(np.float32)


def resample_roundtrip(x: np.ndarray, sr: int, rate: int) -> np.ndarray:
    if sr == rate:
        return x.copy()
    return to_rate(to_rate(x, sr, rate), rate, sr)


def lowpass(x: np.ndarray, sr: int, cutoff: float, order: int = 8) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    if cutoff >= sr / 2:
        return x.copy()
    sos = butter(order, cutoff, btype="low", fs=sr, output="sos")
    return sosfiltfilt(sos, x.astype(np.float64)).astype(np.float32)


def white_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    power = float(np.mean(x.astype(np.float64) ** 2))
    sigma = np.sqrt(max(power, 1e-12) / 10 ** (snr_db / 10))
    return (x + rng.normal(0.0, sigma, x.size)).astype(np.float32)


def spectral_gating(x: np.ndarray, sr: int) -> np.ndarray:
    import noisereduce as nr

    return np.asarray(nr.reduce_noise(y=x.astype(np.float32), sr=sr, stationary=False, prop_decrease=1.0,
                                      n_jobs=1), np.float32)


TRANSFORMS: dict[str, Transform] = {
    "mp3_128": Transform("mp3_128", "MP3 128 kb/s (LAME)", lambda x, sr, s: mp3_roundtrip(x, sr, 128)),
    "mp3_64": Transform("mp3_64", "MP3 64 kb/s (LAME)", lambda x, sr, s: mp3_roundtrip(x, sr, 64)),
    "mp3_32": Transform("mp3_32", "MP3 32 kb/s (LAME)", lambda x, sr, s: mp3_roundtrip(x, sr, 32)),
    "resample_16k": Transform("resample_16k", "resample to 16 kHz and back",
                              lambda x, sr, s: resample_roundtrip(x, sr, 16_000)),
    "lowpass_4k": Transform("lowpass_4k", "low-pass 4 kHz (Butterworth, order 8, zero-phase)",
                            lambda x, sr, s: lowpass(x, sr, 4000.0)),
    "noise_30db": Transform("noise_30db", "white noise at 30 dB SNR", lambda x, sr, s: white_noise(x, 30.0, s)),
    "denoise": Transform("denoise", "speech denoiser purification (noisereduce spectral gating)",
                         lambda x, sr, s: spectral_gating(x, sr)),
}


def get_transforms(names: list[str] | tuple[str, ...] | None) -> list[Transform]:
    """Transforms by name (None = all); ValueError for an unknown name."""
    if names is None:
        return list(TRANSFORMS.values())
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; known: {', '.join(TRANSFORMS)}")
    return [TRANSFORMS[n] for n in names]


__all__ = ["Transform", "TRANSFORMS", "get_transforms", "mp3_roundtrip", "resample_roundtrip", "lowpass",
           "white_noise", "spectral_gating", "fit_length"]
