"""PCM bytes <-> float32 samples in the wire's sample encodings, named "float32" and "int16" (server.wire maps the
names to cloak.v1.SampleEncoding), with the budget-preserving int16 rounding. No protobuf here.
"""

from __future__ import annotations

import hashlib

import numpy as np

from cloak.audio import fit_to_budget

DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
INT16_FULL = 32768.0


def encode(audio: np.ndarray, encoding: str, reference: np.ndarray | None = None, epsilon: float = 0.0) -> bytes:
    """PCM bytes of float32 audio in the wire encoding. For int16 with a `reference` (the input, on the 16-bit
    grid) the output is quantised within +-epsilon of it (cloak.audio.fit_to_budget): the budget holds on what is
    stored; without one, rounded to nearest."""
    if encoding == "float32":
        return np.ascontiguousarray(audio, dtype="<f4").tobytes()
    if reference is not None:
        audio = fit_to_budget(audio, reference, epsilon, "PCM_16")
    q = np.rint(np.asarray(audio, dtype=np.float64) * INT16_FULL)
    return np.clip(q, -INT16_FULL, INT16_FULL - 1).astype("<i2").tobytes()


def decode(data: bytes, encoding: str, channels: int) -> np.ndarray:
    """float32 samples, (frames,) for mono and (frames, channels) otherwise."""
    raw = np.frombuffer(data, dtype=DTYPES[encoding])
    x = raw.astype(np.float32) / INT16_FULL if encoding == "int16" else raw.astype(np.float32)
    return x if channels == 1 else x.reshape(-1, channels)


def delivered_linf(data: bytes, encoding: str, reference: np.ndarray, block: int = 1 << 20) -> float:
    """max |decoded output - reference| over the PCM as sent (int16 rounding included), in blocks of `block`
    samples so that a long clip needs no second full-size float copy."""
    ref = reference.reshape(-1)
    itemsize = DTYPES[encoding].itemsize
    worst = 0.0
    for off in range(0, ref.shape[0], block):
        part = decode(data[off * itemsize:(off + block) * itemsize], encoding, 1)
        worst = max(worst, float(np.max(np.abs(part - ref[off:off + block]))))
    return worst


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
