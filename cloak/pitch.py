"""F0 contours on DiffVC's mel frame grid, and moving a contour to another speaker's pitch statistics.

The source's contour (what is said, and its intonation) is measured with Praat's autocorrelation pitch tracker
(`praat-parselmouth`): it is not on the reference path, so it need not be differentiable. The reference's pitch
*statistics* are predicted inside the attack graph by the speaker-adaptive prior (`cloak.models.prior`), so every
path from the reference waveform to the clone stays differentiable.

Frame i of DiffVC's mel (hop 256, n_fft 1024, 384-sample reflect pad, center=False) covers samples
[256 i - 384, 256 i + 640) at 22.05 kHz: its centre is sample 256 i + 128.
"""

from __future__ import annotations

import math

import numpy as np

from .features import DIFFVC_HOP, DIFFVC_RATE

F0_FLOOR_HZ = 60.0
F0_CEILING_HZ = 500.0
DEFAULT_LOG_F0 = math.log(150.0)  # a contour with no voiced frame at all sits here (flagged unvoiced throughout)
MIN_LOG_F0_STD = 0.03  # ~0.5 semitone: a floor for the spread of a (nearly) monotone contour


def frame_times(frames: int) -> np.ndarray:
    """Centre time (s) of each DiffVC mel frame."""
    return (np.arange(frames) * DIFFVC_HOP + DIFFVC_HOP // 2) / DIFFVC_RATE


def f0_contour(wave: np.ndarray, rate: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-F0, voiced) on DiffVC's frame grid for a mono waveform: log-F0 (frames,) float32 in log-Hz, linearly
    interpolated across unvoiced frames (held at the ends) so that the contour is continuous; voiced (frames,)
    bool. Praat autocorrelation pitch, 10 ms step, 60-500 Hz."""
    import parselmouth  # praat-parselmouth: imported here so that importing cloak stays light

    wave = np.ascontiguousarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"f0_contour needs a mono waveform, got shape {wave.shape}")
    centres = frame_times(frames)
    if len(wave) < int(0.05 * rate):  # shorter than Praat's analysis window: nothing can be voiced
        return np.full(frames, DEFAULT_LOG_F0, np.float32), np.zeros(frames, bool)
    pitch = parselmouth.Sound(wave, float(rate)).to_pitch_ac(time_step=0.01, pitch_floor=F0_FLOOR_HZ,
                                                            pitch_ceiling=F0_CEILING_HZ)
    f = np.asarray(pitch.selected_array["frequency"], dtype=np.float64)
    times = np.asarray(pitch.xs(), dtype=np.float64)
    ok = f > 0
    if not ok.any():
        return np.full(frames, DEFAULT_LOG_F0, np.float32), np.zeros(frames, bool)
    nearest = np.clip(np.searchsorted(times, centres), 0, len(times) - 1)
    prev = np.clip(nearest - 1, 0, len(times) - 1)
    nearest = np.where(np.abs(times[prev] - centres) < np.abs(times[nearest] - centres), prev, nearest)
    voiced = ok[nearest] & (np.abs(times[nearest] - centres) <= 0.01)
    log_f0 = np.interp(centres, times[ok], np.log(f[ok]))
    return log_f0.astype(np.float32), voiced


def contour_stats(log_f0: np.ndarray, voiced: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of log-F0 over voiced frames (DEFAULT_LOG_F0 and the floor when none)."""
    v = log_f0[voiced]
    if v.size == 0:
        return DEFAULT_LOG_F0, MIN_LOG_F0_STD
    return float(v.mean()), float(max(v.std(), MIN_LOG_F0_STD))
