"""Reading, checking and atomically writing voice recordings.

Every problem with the input (a missing or unreadable file, an empty or too short clip, NaN samples, an
impossible shape or sample rate, samples that an integer format cannot store) raises :class:`AudioError`,
whose message names the file (or array) and the problem.

Conventions: samples are float32 in full scale [-1, 1], shaped ``(frames,)`` for mono and
``(frames, channels)`` for multichannel audio (soundfile's layout, frames first).

AudioError and the checks shared by reading, validation and writing are in cloak.audio_checks; containers,
subtypes and the encoding of samples for them in cloak.audio_formats.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .audio_checks import AudioError, as_float32, check_finite, check_length, check_limits
from .audio_formats import DECODED_AS, FLOAT_SUBTYPES, INTEGER_PCM_BITS, PCM_BITS, encode_samples, resolve_format
from .files import replace_atomically

__all__ = [
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "Audio",
    "fit_to_budget",
    "output_subtype",
    "passthrough_reason",
    "read_audio",
    "read_exact",
    "to_mono",
    "to_rate",
    "validate_samples",
    "write_audio",
]

PathLike = str | os.PathLike[str]

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8


@dataclass(frozen=True, eq=False)
class Audio:
    """A decoded recording.

    samples      float32, ``(frames,)`` for mono, ``(frames, channels)`` for multichannel.
    sample_rate  frames per second.
    subtype      soundfile subtype of the source (``'PCM_16'``, ``'FLOAT'``, ...), None if not from a file.
    format       soundfile container of the source (``'WAV'``, ``'FLAC'``, ...), None if not from a file.

    Instances compare by identity (``eq=False``): comparing arrays element-wise has no single truth value.
    """

    samples: np.ndarray
    sample_rate: int
    subtype: str | None = None
    format: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.samples, np.ndarray) or self.samples.ndim not in (1, 2):
            raise AudioError(
                f"Audio samples must be a 1-D or 2-D numpy array, got {type(self.samples).__name__}"
                f" of shape {getattr(self.samples, 'shape', None)}"
            )
        if self.samples.dtype != np.float32:
            raise AudioError(f"Audio samples must be float32, got {self.samples.dtype}")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int | np.integer):
            raise AudioError(f"Audio sample_rate must be an int, got {self.sample_rate!r}")
        if self.sample_rate <= 0:
            raise AudioError(f"Audio sample_rate must be positive, got {self.sample_rate}")

    @property
    def frames(self) -> int:
        """Number of sample frames (time steps)."""
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels (1 for a ``(frames,)`` array)."""
        return 1 if self.samples.ndim == 1 else int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


# ----------------------------------------------------------------------------------------------- validation


def _check_rate(name: str, sample_rate: Any) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise AudioError(f"{name}: sample rate must be an integer number of Hz, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: sample rate {rate} Hz is outside the supported {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    return rate


def validate_samples(
    samples: Any,
    sample_rate: int,
    *,
    name: str = "audio",
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Check an in-memory clip and return it as a new float32 array (the input is never modified).

    Accepts float32/float64 arrays (full scale +-1) and int16/int32 arrays (scaled to [-1, 1)), shaped
    ``(frames,)`` or ``(frames, channels)`` with 1..8 channels, at 8000..192000 Hz. Raises
    :class:`AudioError` naming ``name`` for anything else, an empty clip, a clip shorter than
    ``min_seconds`` or longer than ``max_seconds``, and NaN/inf samples.
    """
    check_limits(name, min_seconds, max_seconds)
    shape = np.shape(samples)
    if len(shape) not in (1, 2):
        raise AudioError(f"{name}: samples must have shape (frames,) or (frames, channels), got {shape}")
    if len(shape) == 2:
        channels = shape[1]
        if channels < 1 or channels > MAX_CHANNELS:
            hint = ""
            if channels > MAX_CHANNELS and 1 <= shape[0] <= MAX_CHANNELS:
                hint = " (it looks transposed: samples are (frames, channels), pass samples.T)"
            raise AudioError(
                f"{name}: {channels} channels, shape {shape}; 1..{MAX_CHANNELS} channels supported{hint}"
            )
    rate = _check_rate(name, sample_rate)
    out = as_float32(samples, name)
    check_length(name, int(out.shape[0]), rate, min_seconds, max_seconds)
    check_finite(name, out)
    return out


def to_rate(x: np.ndarray, sr: int, new_sr: int) -> np.ndarray:
    """Polyphase (Kaiser-windowed) resampling with scipy; float32 out."""
    x = np.asarray(x, dtype=np.float32)
    if sr == new_sr:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(sr), int(new_sr))
    return resample_poly(x, new_sr // g, sr // g).astype(np.float32)


def to_mono(samples: Any) -> np.ndarray:
    """Average the channels: ``(frames, channels)`` -> float32 ``(frames,)``; a mono array is copied."""
    arr = as_float32(samples, "to_mono")
    if arr.ndim == 1:
        return arr
    if arr.ndim != 2:
        raise AudioError(f"to_mono: samples must have shape (frames,) or (frames, channels), got {arr.shape}")
    if arr.shape[1] == 0:
        raise AudioError(f"to_mono: samples have no channels, shape {arr.shape}")
    return arr.mean(axis=1, dtype=np.float64).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- read


def read_audio(path: PathLike, *, min_seconds: float = 0.1, max_seconds: float | None = None) -> Audio:
    """Decode any file libsndfile reads (WAV, FLAC, OGG, MP3, AIFF, ...), any rate, any channel count.

    Samples come back as float32, ``(frames,)`` for a mono file and ``(frames, channels)`` otherwise.
    Raises :class:`AudioError` for a missing file, one that is not audio, an empty clip, one shorter than
    ``min_seconds`` or longer than ``max_seconds``, and NaN/inf samples.
    """
    p = Path(path)
    name = str(p)
    check_limits(name, min_seconds, max_seconds)
    if not p.exists():
        raise AudioError(f"{name}: file not found")
    if p.is_dir():
        raise AudioError(f"{name}: is a directory, not an audio file")
    try:
        with sf.SoundFile(name) as f:
            rate, fmt, subtype = int(f.samplerate), str(f.format), str(f.subtype)
            if f.frames > 0 and max_seconds is not None and f.frames / rate > max_seconds:
                # refuse before decoding a huge file
                check_length(name, int(f.frames), rate, min_seconds, max_seconds)
            data = f.read(_frames_to_read(f), dtype="float32", always_2d=False)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(f"{name}: not readable as audio: {exc}") from exc
    samples = np.ascontiguousarray(data, dtype=np.float32)
    if rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate}")
    check_length(name, int(samples.shape[0]), rate, min_seconds, max_seconds)
    check_finite(name, samples)
    return Audio(samples=samples, sample_rate=rate, subtype=subtype, format=fmt)


# ---------------------------------------------------------------------------------------------------- write


# libsndfile's SFC_SET_ADD_PEAK_CHUNK: the PEAK chunk of float WAV/AIFF files carries the time of writing, so two
# writes of the same samples would differ in their bytes; without it they are byte-identical.
_SFC_SET_ADD_PEAK_CHUNK = 0x1050


def _sf_write(path: Path, payload: np.ndarray, sample_rate: int, subtype: str, fmt: str) -> None:
    channels = 1 if payload.ndim == 1 else int(payload.shape[1])
    with sf.SoundFile(str(path), "w", int(sample_rate), channels, subtype=subtype, format=fmt) as f:
        if subtype in FLOAT_SUBTYPES:
            snd, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
            if snd is not None and ffi is not None:  # soundfile has no public call for it
                snd.sf_command(f._file, _SFC_SET_ADD_PEAK_CHUNK, ffi.NULL, 0)
        f.write(payload)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(a.resolve()) == os.path.normcase(b.resolve())


def write_audio(
    path: PathLike,
    samples: Any,
    sample_rate: int,
    *,
    subtype: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    protect_original: PathLike | None = None,
) -> Path:
    """Write a clip atomically and return the path written.

    The data goes to a hidden ``.<name>.<random>.partial`` file in the target's directory, is flushed to
    disk, then moved over the target with :func:`os.replace`; on any failure the partial file is removed and
    an existing target is left untouched.

    The container comes from ``format`` or the extension (.wav, .flac, .aiff/.aif, .ogg, .mp3; anything
    else is WAV). The default subtype is FLOAT (32-bit float) for WAV/AIFF, PCM_24 for FLAC, Vorbis for OGG
    and MPEG layer III for MP3. Nothing is clipped silently: samples beyond [-1, 1] raise for any subtype
    that is not floating point. Integer PCM is quantized here (round to nearest; pass samples already on the
    subtype's grid, e.g. from :func:`fit_to_budget`, to control the rounding); float64 samples are quantized
    from float64 for DOUBLE and PCM_32. No PEAK chunk is written, so the same samples give the same bytes.

    Raises :class:`AudioError` if the target exists and ``overwrite`` is false, if it is the same file as
    ``protect_original``, and for any samples :func:`validate_samples` rejects (no minimum length here).
    """
    target = Path(path)
    name = str(target)
    if protect_original is not None and _same_file(target, Path(protect_original)):
        raise AudioError(f"{name}: writing here would overwrite the original recording {protect_original}")
    if target.is_dir():
        raise AudioError(f"{name}: is a directory")
    if target.exists() and not overwrite:
        raise AudioError(f"{name}: file already exists (pass overwrite=True to replace it)")
    parent = target.parent
    if not parent.is_dir():
        raise AudioError(f"{name}: directory {parent} does not exist")
    fmt, sub = resolve_format(target, subtype, format)
    data = validate_samples(samples, sample_rate, name=name, min_seconds=0.0)
    if np.asarray(samples).dtype == np.float64 and (sub == "DOUBLE" or INTEGER_PCM_BITS.get(sub, 0) > 24):
        data = np.asarray(samples)  # float32 cannot hold every DOUBLE / 32-bit value: quantize from float64
    payload = encode_samples(data, sub, name)

    def write(tmp: Path) -> None:
        try:
            _sf_write(tmp, payload, int(sample_rate), sub, fmt)
        except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
            if isinstance(exc, AudioError):
                raise
            raise AudioError(f"{name}: could not write {fmt}/{sub} at {sample_rate} Hz: {exc}") from exc

    try:
        return replace_atomically(target, write)
    except FileExistsError as exc:  # no free name for the partial file
        raise AudioError(str(exc)) from exc


def fit_to_budget(out: np.ndarray, inp: np.ndarray, epsilon: float, subtype: str | None = None) -> np.ndarray:
    """What to store so that |stored - input| <= epsilon holds on the written samples, exactly.

    Integer PCM (``subtype`` PCM_S8/U8/16/24/32): each sample goes onto the subtype's grid, rounded to nearest
    unless that would break the bound, in which case it is rounded toward the input sample; no dither. Where
    the grid has no point within the bound (a float input whose budget is under half a step) the nearest point
    to the input is kept. Returns float32 up to 24 bits (exact there), float64 for PCM_32.
    DOUBLE: float64 input + the clipped difference. Float (FLOAT or None): float32, with any float32 rounding
    that stepped past the bound undone. Pass ``inp`` as float64 (:func:`read_exact`) for PCM_32 and DOUBLE
    files, whose samples float32 cannot hold."""
    bits = PCM_BITS.get(subtype or "")
    x = inp.astype(np.float64)
    if bits is not None:
        full = float(2 ** (bits - 1))
        q = np.rint(out.astype(np.float64) * full)
        lo, hi = np.ceil((x - epsilon) * full), np.floor((x + epsilon) * full)
        q = np.where(lo <= hi, np.clip(q, lo, hi), np.rint(x * full))
        return (np.clip(q, -full, full - 1) / full).astype(np.float64 if bits > 24 else np.float32)
    dtype = np.float64 if subtype == "DOUBLE" else np.float32
    y = (x + np.clip(out.astype(np.float64) - x, -epsilon, epsilon)).astype(dtype)
    target = inp.astype(dtype)
    for _ in range(8):  # rounding of the line above can still overshoot by a few ulps
        bad = np.abs(y.astype(np.float64) - x) > epsilon
        if not bad.any():
            break
        y[bad] = np.nextafter(y[bad], target[bad])
    return y


def read_exact(path: PathLike) -> np.ndarray:
    """The samples of an audio file as float64 (every PCM_32 and DOUBLE value exactly; float32 cannot hold
    them), ``(frames,)`` for mono, ``(frames, channels)`` otherwise. Use :func:`read_audio` to check a file."""
    try:
        with sf.SoundFile(str(path)) as f:
            data = f.read(_frames_to_read(f), dtype="float64", always_2d=False)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioError(f"{path}: not readable as audio: {exc}") from exc
    return np.ascontiguousarray(data)


def _frames_to_read(f: sf.SoundFile) -> int:
    """All frames: -1 where the file is seekable; libsndfile opens some codecs (G.721, GSM 6.10, NMS ADPCM)
    as non-seekable, and soundfile then needs the count, which their header gives."""
    return -1 if f.seekable() else int(f.frames)


def output_subtype(fmt: str, in_subtype: str | None, epsilon: float) -> tuple[str, str | None]:
    """The subtype a protected copy of an ``in_subtype`` recording is written in, inside container ``fmt``
    (WAV, FLAC, AIFF), and a note when it is not the input's own.

    Float stays float (FLOAT, DOUBLE); integer PCM keeps its bit depth; lossy or companded encodings (u-law,
    ADPCM, Vorbis, MP3, ...) are written as the PCM or float their decoder produces. A bit depth whose step is
    larger than ``epsilon`` (8-bit: 1/128) could only store the input unchanged: the next depth that can hold
    the perturbation is used instead. Float in a container without float (FLAC) becomes PCM_24."""
    fmt = fmt.upper()
    sub = (in_subtype or "").upper()
    note: str | None = None
    if sub in FLOAT_SUBTYPES or sub in PCM_BITS:
        want = sub
    elif sub in DECODED_AS:
        want = DECODED_AS[sub]
        note = (f"{sub} is a lossy or companded encoding: the protected copy is written as {want}, because "
                "re-encoding would weaken the protection")
    else:
        want = "FLOAT"
        note = f"subtype {sub or 'unknown'}: the protected copy is written as FLOAT"
    if want in FLOAT_SUBTYPES and not sf.check_format(fmt, want):
        note = f"{fmt} cannot store {want} samples: the protected copy is written as PCM_24"
        want = "PCM_24"
    bits = PCM_BITS.get(want)
    if bits is not None and 2.0 ** (1 - bits) > epsilon:
        deeper = [s for s in ("PCM_16", "PCM_24", "PCM_32") if 2.0 ** (1 - PCM_BITS[s]) <= epsilon
                  and sf.check_format(fmt, s)]
        better = deeper[0] if deeper else ("FLOAT" if sf.check_format(fmt, "FLOAT") else "PCM_24")
        note = (f"{want} steps of {2.0 ** (1 - bits):.3g} cannot hold a perturbation of at most {epsilon:g}: "
                f"the protected copy is written as {better}")
        want = better
    if not sf.check_format(fmt, want):  # e.g. PCM_U8 asked of FLAC
        note = f"{fmt} cannot store {want}: the protected copy is written as PCM_24"
        want = "PCM_24"
    return want, note


MIN_PROTECT_SECONDS = 0.5
SILENCE_PEAK_DBFS = -60.0


def passthrough_reason(samples: np.ndarray, sample_rate: int) -> str | None:
    """Why a clip is not worth protecting (None if it is): shorter than 0.5 s (too short to protect, or to
    clone a voice from), or silent (no sample above -60 dBFS). Such clips are returned unchanged."""
    seconds = samples.shape[0] / sample_rate
    if seconds < MIN_PROTECT_SECONDS:
        return f"the clip is {seconds:.3f} s long, shorter than {MIN_PROTECT_SECONDS} s: too short to protect"
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= 10 ** (SILENCE_PEAK_DBFS / 20):
        level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.1f} dBFS"
        return f"the clip is silent ({level}, nothing above {SILENCE_PEAK_DBFS:g} dBFS): nothing to protect"
    return None


def output_problem(target: PathLike, create_dirs: bool = False) -> str | None:
    """Why ``target`` cannot be written (None if it can): its directory is missing (unless ``create_dirs``: then
    the nearest existing ancestor must be a writable directory), is a file, or is not writable. Checked by
    creating and removing a hidden temporary file, so permissions, read-only mounts and full quota all show."""
    path = Path(target)
    parent = path.parent
    if parent.exists():
        if not parent.is_dir():
            return f"{parent} is a file, not a directory"
        probe_dir = parent
    elif not create_dirs:
        ancestor = next((a for a in parent.parents if a.exists()), None)
        if ancestor is not None and not ancestor.is_dir():
            return f"directory {parent} does not exist ({ancestor} is a file)"
        return f"directory {parent} does not exist"
    else:
        ancestor = next((a for a in parent.parents if a.exists()), Path(parent.anchor or "."))
        if not ancestor.is_dir():
            return f"cannot create directory {parent}: {ancestor} is a file"
        probe_dir = ancestor
    try:
        fd, probe = _probe(probe_dir, path.name)
    except OSError as exc:
        return f"directory {probe_dir} is not writable: {exc.strerror or exc}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _probe(directory: Path, base: str) -> tuple[int, Path]:
    for _ in range(100):
        probe = directory / f".{base}.{secrets.token_hex(4)}.probe"
        try:
            return os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), probe
        except FileExistsError:
            continue
    raise OSError(f"could not create a probe file in {directory}")
