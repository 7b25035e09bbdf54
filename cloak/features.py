"""Differentiable front-ends: DiffVC's log-mel at 22.05 kHz, GE2E's power mel at 16 kHz, resampling.

Everything here is plain torch, works on batches (B, N) and is differentiable with respect to the waveform.
"""

from __future__ import annotations

from functools import lru_cache

import julius
import numpy as np
import torch

DIFFVC_RATE = 22050
DIFFVC_HOP = 256
DIFFVC_NFFT = 1024
DIFFVC_MELS = 80
DIFFVC_FMAX = 8000.0
LOG_FLOOR = 1e-5

GE2E_RATE = 16000
GE2E_NFFT = 400
GE2E_HOP = 160
GE2E_MELS = 40


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = f >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-style, Slaney-normalised mel filterbank (librosa's default), shape (n_mels, n_fft//2+1)."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel_slaney(np.array(fmin)), _hz_to_mel_slaney(np.array(fmax)), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels])
    return (weights * enorm[:, None]).astype(np.float32)


def mel_centre_frequencies(n_mels: int = DIFFVC_MELS, fmax: float = DIFFVC_FMAX, fmin: float = 0.0) -> np.ndarray:
    """Centre frequency (Hz) of each bin of a Slaney mel filterbank (`mel_filterbank` with the same arguments)."""
    pts = np.linspace(_hz_to_mel_slaney(np.array(fmin)), _hz_to_mel_slaney(np.array(fmax)), n_mels + 2)
    return _mel_to_hz_slaney(pts[1:-1])


@lru_cache(maxsize=16)
def _diffvc_consts(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    basis = torch.from_numpy(mel_filterbank(DIFFVC_RATE, DIFFVC_NFFT, DIFFVC_MELS, 0.0, DIFFVC_FMAX))
    window = torch.hann_window(DIFFVC_NFFT, dtype=torch.float64)
    return basis.to(device=device, dtype=dtype), window.to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _ge2e_consts(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    basis = torch.from_numpy(mel_filterbank(GE2E_RATE, GE2E_NFFT, GE2E_MELS))
    window = torch.hann_window(GE2E_NFFT, dtype=torch.float64)
    return basis.to(device=device, dtype=dtype), window.to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _mel_map(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(40, 80) map from DiffVC band power densities to GE2E band powers, and each DiffVC band's 1 / weight^2."""
    w = mel_filterbank(DIFFVC_RATE, DIFFVC_NFFT, DIFFVC_MELS, 0.0, DIFFVC_FMAX).astype(np.float64)  # (80, 513)
    v = mel_filterbank(GE2E_RATE, GE2E_NFFT, GE2E_MELS).astype(np.float64)  # (40, 201)
    f_w = np.linspace(0.0, DIFFVC_RATE / 2.0, w.shape[1])
    f_v = np.linspace(0.0, GE2E_RATE / 2.0, v.shape[1])
    tri = np.stack([np.interp(f_v, f_w, row) for row in w], 1)  # each DiffVC triangle at GE2E's bins (201, 80)
    cover = tri.sum(1, keepdims=True)
    density = np.where(cover > 0, tri / np.maximum(cover, 1e-12), 0.0)  # a GE2E bin's density from the bands over it
    # Hann power gains of the two STFTs (sum of w^2 = 3N/8): GE2E's 400-point power vs DiffVC's 1024-point amplitude
    gain = (3 * GE2E_NFFT / 8) / (3 * DIFFVC_NFFT / 8)
    mapping = torch.from_numpy(gain * v @ density)
    inv_w2 = torch.from_numpy(1.0 / np.maximum(w.sum(1), 1e-12) ** 2)
    return mapping.to(device=device, dtype=dtype), inv_w2.to(device=device, dtype=dtype)


def ge2e_frames_from_diffvc_mel(log_mel: torch.Tensor) -> torch.Tensor:
    """GE2E's input features approximated from a DiffVC log-mel, without a waveform (so without a vocoder):
    (B, 80, T) natural-log amplitude mel at 22.05 kHz -> (B, T', 40) power mel on GE2E's 10 ms frame grid.

    Each DiffVC band's amplitude over its filter weight is the band's mean magnitude, squared a power density;
    GE2E's bands integrate the densities of the DiffVC bands under them; frames are linearly interpolated from
    DiffVC's 11.6 ms hop. What GE2E embeds from these agrees with its embedding of the waveform itself (cosine
    0.90-0.98 on the corpus speakers, tests/test_features.py). Differentiable; used by the engine's L_voice."""
    mapping, inv_w2 = _mel_map(log_mel.device, log_mel.dtype)
    power = torch.exp(2.0 * log_mel) * inv_w2[:, None]
    bands = torch.einsum("jk,bkt->bjt", mapping, power)
    frames = max(1, round(log_mel.shape[-1] * DIFFVC_HOP / DIFFVC_RATE * GE2E_RATE / GE2E_HOP))
    return torch.nn.functional.interpolate(bands, size=frames, mode="linear", align_corners=False).transpose(1, 2)


def _as_batch(wave: torch.Tensor) -> torch.Tensor:
    if wave.dim() == 1:
        return wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"expected a (B, N) or (N,) waveform tensor, got shape {tuple(wave.shape)}")
    return wave


def diffvc_frames(n_samples: int) -> int:
    """Number of DiffVC mel frames for a 22.05 kHz waveform of n_samples."""
    return n_samples // DIFFVC_HOP


def diffvc_mel(wave_22k: torch.Tensor) -> torch.Tensor:
    """DiffVC's `get_mel` (= HiFi-GAN `mel_spectrogram`) as a differentiable torch op.

    (B, N) float waveform at 22.05 kHz -> (B, 80, N // 256) natural-log mel, floor ln(1e-5), no normalisation.
    """
    wave = _as_batch(wave_22k)
    n = wave.shape[-1] // DIFFVC_HOP * DIFFVC_HOP
    if n == 0:
        raise ValueError(f"waveform too short for one DiffVC frame: {wave.shape[-1]} samples")
    wave = wave[:, :n]
    pad = (DIFFVC_NFFT - DIFFVC_HOP) // 2
    wave = torch.nn.functional.pad(wave.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    basis, window = _diffvc_consts(wave.device, wave.dtype)
    spec = torch.stft(wave, DIFFVC_NFFT, hop_length=DIFFVC_HOP, win_length=DIFFVC_NFFT, window=window,
                      center=False, return_complex=True)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = torch.matmul(basis, mag)
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


def ge2e_mel(wave_16k: torch.Tensor) -> torch.Tensor:
    """GE2E input features: (B, N) at 16 kHz -> (B, frames, 40) linear power mel (librosa.feature.melspectrogram
    defaults: n_fft 400, hop 160, centred with zero padding, Hann window, power 2, Slaney mel)."""
    wave = _as_batch(wave_16k)
    basis, window = _ge2e_consts(wave.device, wave.dtype)
    spec = torch.stft(wave, GE2E_NFFT, hop_length=GE2E_HOP, win_length=GE2E_NFFT, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    power = spec.real.pow(2) + spec.imag.pow(2)
    return torch.matmul(basis, power).transpose(1, 2)


@lru_cache(maxsize=32)
def _resampler(orig_rate: int, new_rate: int, device: torch.device, dtype: torch.dtype) -> julius.ResampleFrac:
    """The sinc kernels are built once per (rates, device, dtype): building them costs more than applying them."""
    return julius.ResampleFrac(orig_rate, new_rate).to(device=device, dtype=dtype)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (windowed sinc) resampling along the last axis; differentiable; identity when rates match."""
    if orig_rate == new_rate:
        return wave
    return _resampler(int(orig_rate), int(new_rate), wave.device, wave.dtype)(wave)


def resampled_length(n: int, orig_rate: int, new_rate: int) -> int:
    """Output length of `resample` for an input of n samples."""
    if orig_rate == new_rate:
        return n
    g = np.gcd(int(orig_rate), int(new_rate))
    return int(n * (new_rate // g) // (orig_rate // g))
