"""Containers and subtypes of audio files: the container an extension means, each container's default subtype,
which subtypes store floats or integer PCM (and at how many bits), what lossy encodings decode to, and the samples
handed to soundfile for a subtype (integer PCM quantized here, so writes are bit-exact on any libsndfile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .audio_checks import AudioError

# Container inferred from the file extension; anything else is written as WAV.
EXTENSION_FORMATS: dict[str, str] = {
    ".wav": "WAV",
    ".flac": "FLAC",
    ".aiff": "AIFF",
    ".aif": "AIFF",
    ".ogg": "OGG",
    ".mp3": "MP3",
}
# Subtype used when the caller names none.
DEFAULT_SUBTYPES: dict[str, str] = {
    "WAV": "FLOAT",
    "FLAC": "PCM_24",
    "AIFF": "FLOAT",
    "OGG": "VORBIS",
    "MP3": "MPEG_LAYER_III",
}
# Subtypes that store floating point and so keep values outside [-1, 1].
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
# Linear integer PCM subtypes: bits per sample. We quantize these ourselves (round to nearest, scale
# 2**(bits-1), the inverse of libsndfile's int -> float read) so a clip read from an integer file is written
# back bit-exact, whatever libsndfile version does the float -> int conversion.
INTEGER_PCM_BITS: dict[str, int] = {
    "PCM_S8": 8,
    "PCM_U8": 8,
    "PCM_16": 16,
    "PCM_24": 24,
    "PCM_32": 32,
    "ALAC_16": 16,
    "ALAC_20": 20,
    "ALAC_24": 24,
    "ALAC_32": 32,
}
# Integer PCM subtypes a protected copy is stored in: cloak.audio's fit_to_budget puts samples on their grid.
PCM_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}

# Lossy or companded encodings: what their decoded samples are written as (re-encoding them would both weaken the
# perturbation and add coding noise far above epsilon). Integer codecs decode to 16 (24) bit values, exactly stored
# as PCM; perceptual codecs decode to floats.
DECODED_AS: dict[str, str] = {
    "ULAW": "PCM_16", "ALAW": "PCM_16", "IMA_ADPCM": "PCM_16", "MS_ADPCM": "PCM_16", "GSM610": "PCM_16",
    "VOX_ADPCM": "PCM_16", "G721_32": "PCM_16", "G723_24": "PCM_16", "G723_40": "PCM_16",
    "NMS_ADPCM_16": "PCM_16", "NMS_ADPCM_24": "PCM_16", "NMS_ADPCM_32": "PCM_16", "DPCM_8": "PCM_16",
    "DPCM_16": "PCM_16", "DWVW_12": "PCM_16", "DWVW_16": "PCM_16", "DWVW_24": "PCM_24", "DWVW_N": "PCM_24",
    "VORBIS": "FLOAT", "OPUS": "FLOAT", "MPEG_LAYER_I": "FLOAT", "MPEG_LAYER_II": "FLOAT",
    "MPEG_LAYER_III": "FLOAT",
}


def resolve_format(path: Path, subtype: str | None, fmt: str | None) -> tuple[str, str]:
    name = str(path)
    if fmt is None:
        fmt = EXTENSION_FORMATS.get(path.suffix.lower(), "WAV")
    fmt = fmt.upper()
    if fmt not in sf.available_formats():
        raise AudioError(f"{name}: unknown audio format {fmt!r}")
    if subtype is None:
        subtype = DEFAULT_SUBTYPES.get(fmt) or sf.default_subtype(fmt)
        if subtype is None:
            raise AudioError(f"{name}: no default subtype for format {fmt}; pass subtype=")
    subtype = subtype.upper()
    if not sf.check_format(fmt, subtype):
        raise AudioError(f"{name}: format {fmt} cannot store subtype {subtype}")
    return fmt, subtype


def encode_samples(samples: np.ndarray, subtype: str, name: str) -> np.ndarray:
    """What to hand soundfile for ``subtype``: floats as they are, or integers quantized by us."""
    if subtype in FLOAT_SUBTYPES:
        return samples.astype(np.float64 if subtype == "DOUBLE" else np.float32, copy=False)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 1.0:
        raise AudioError(
            f"{name}: samples peak at {peak:.6g}, outside [-1, 1]; subtype {subtype} would clip them"
            " (scale the audio down or write subtype='FLOAT')"
        )
    bits = INTEGER_PCM_BITS.get(subtype)
    if bits is None:  # codecs (Vorbis, MP3, u-law, ADPCM, ...): libsndfile encodes from float
        return samples.astype(np.float32, copy=False)
    container, width = (np.int16, 16) if bits <= 16 else (np.int32, 32)
    full = float(2 ** (bits - 1))
    q = np.clip(np.rint(samples.astype(np.float64) * full), -full, full - 1)
    return (q.astype(np.int64) << (width - bits)).astype(container)
