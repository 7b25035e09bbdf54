"""An MP3 round trip (LAME via lameenc, CBR, quality 2; decoded by libsndfile), sample-aligned with its input:
what a platform that re-encodes an upload does to it. Used by the robustness transforms of `cloak evaluate` and by
the engine's expectation over transformation (cloak.eot)."""

from __future__ import annotations

import io

import numpy as np

from .audio import to_rate

# MP3 sample rates LAME encodes at without resampling (MPEG-1, -2 and -2.5 layer III)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# LAME's encoder delay (576 + 529 samples, not removed by libsndfile) plus up to four frames: where the lag is sought
MAX_LAG = 4 * 1152 + 529


def fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """y cut or zero-padded to n samples."""
    if y.size >= n:
        return y[:n]
    return np.pad(y, (0, n - y.size))


def best_lag(x: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """The delay (0..max_lag samples) of y relative to x maximising their cross-correlation (FFT)."""
    from scipy.signal import fftconvolve

    n = min(x.size, y.size - max_lag) if y.size > max_lag else 0
    if n <= 0:
        return 0
    corr = fftconvolve(y[: n + max_lag], x[:n][::-1], mode="valid")  # corr[k] = sum_i y[i + k] x[i]
    return int(np.argmax(corr[: max_lag + 1]))


def mp3_roundtrip(x: np.ndarray, sr: int, kbps: int) -> np.ndarray:
    """Mono float audio at `sr` encoded at `kbps` CBR and decoded back at `sr`, the codec's delay found by
    cross-correlation and cut (the result can be longer than x: the encoder pads the last frame)."""
    import lameenc
    import soundfile as sf

    enc = lameenc.Encoder()
    enc.set_bit_rate(int(kbps))
    enc.set_in_sample_rate(int(sr))
    enc.set_channels(1)
    enc.set_quality(2)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    data = bytes(enc.encode(pcm)) + bytes(enc.flush())
    y, out_sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if y.ndim > 1:
        y = y.mean(axis=1)
    y = to_rate(y, int(out_sr), sr)
    lag = best_lag(x, y, max_lag=min(MAX_LAG, max(y.size - 1, 0)))
    return y[lag:]
