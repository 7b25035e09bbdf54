"""The error every bad audio input raises (AudioError, naming the file or array and the problem) and the checks
clips pass wherever they come from (cloak.audio's reading, validation and writing): length limits, finiteness,
and conversion of the accepted dtypes to float32."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Integer dtypes accepted in memory, with their full-scale divisor.
_INT_SCALES: dict[np.dtype[Any], float] = {
    np.dtype(np.int16): 32768.0,
    np.dtype(np.int32): 2147483648.0,
}


class AudioError(ValueError):
    """Bad audio input: the message names the file (or array) and what is wrong with it."""


def check_limits(name: str, min_seconds: float, max_seconds: float | None) -> None:
    if not math.isfinite(min_seconds) or min_seconds < 0:
        raise AudioError(f"{name}: min_seconds must be a finite number >= 0, got {min_seconds!r}")
    if max_seconds is not None and (not max_seconds > 0 or max_seconds < min_seconds):
        raise AudioError(
            f"{name}: max_seconds must be > 0 and >= min_seconds ({min_seconds}), got {max_seconds!r}"
        )


def check_length(
    name: str, frames: int, sample_rate: int, min_seconds: float, max_seconds: float | None
) -> None:
    if frames == 0:
        raise AudioError(f"{name}: audio is empty (0 frames)")
    seconds = frames / sample_rate
    if seconds < min_seconds:
        raise AudioError(
            f"{name}: audio is too short: {seconds:.3f} s ({frames} frames at {sample_rate} Hz),"
            f" at least {min_seconds} s needed"
        )
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: audio is too long: {seconds:.3f} s, at most {max_seconds} s allowed")


def check_finite(name: str, samples: np.ndarray) -> None:
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(samples.shape[0], -1).all(axis=1))
        first = int(bad[0])
        kind = "NaN" if np.isnan(samples[first]).any() else "infinite"
        raise AudioError(
            f"{name}: audio contains NaN or infinite samples"
            f" ({bad.size} frame(s), first {kind} at frame {first})"
        )


def as_float32(samples: Any, name: str) -> np.ndarray:
    """A new float32 array holding ``samples`` (ints scaled to [-1, 1)); never a view of the input."""
    arr = np.asarray(samples)
    if arr.dtype in _INT_SCALES:
        return (arr.astype(np.float64) / _INT_SCALES[arr.dtype]).astype(np.float32)
    if arr.dtype.kind == "f":
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, caught as non-finite
            return np.array(arr, dtype=np.float32, copy=True)
    raise AudioError(
        f"{name}: unsupported sample dtype {arr.dtype}; expected float32, float64, int16 or int32"
    )
