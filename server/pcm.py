"""The wire format: header and settings validation, PCM decoding and encoding.

Every problem raises InvalidInput, whose message names the field or the message at fault; the servicer turns it
into INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, fields

import numpy as np

from cloak import AudioError, ConfigError, ProtectConfig
from cloak.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, validate_samples
from cloak.config import LOSS_NAMES

from .config import MAX_CHUNK_BYTES, MIN_SECONDS
from .gen import cloak_service_pb2 as pb

ENCODINGS: dict[int, tuple[str, np.dtype]] = {
    pb.SAMPLE_ENCODING_FLOAT32: ("float32", np.dtype("<f4")),
    pb.SAMPLE_ENCODING_INT16: ("int16", np.dtype("<i2")),
}
GENDERS = {pb.GENDER_UNSPECIFIED: None, pb.GENDER_AUTO: "auto", pb.GENDER_FEMALE: "female", pb.GENDER_MALE: "male"}
GENDER_ENUM = {"auto": pb.GENDER_AUTO, "female": pb.GENDER_FEMALE, "male": pb.GENDER_MALE}
ENCODERS = {pb.SPEAKER_ENCODER_GE2E: "ge2e", pb.SPEAKER_ENCODER_WAVLM: "wavlm"}
ENCODER_ENUM = {v: k for k, v in ENCODERS.items()}
LOSSES = {pb.LOSS_TERM_ID: "id", pb.LOSS_TERM_CTX: "ctx", pb.LOSS_TERM_SCORE: "score", pb.LOSS_TERM_SEM: "sem"}
LOSS_ENUM = {v: k for k, v in LOSSES.items()}
_SCALAR_FIELDS = ("epsilon", "step_size", "iterations", "repeats", "t_adv", "seed", "source_frames", "window_seconds",
                  "overlap_seconds", "inference_steps", "early_stop", "early_stop_every", "early_stop_identity_drop",
                  "early_stop_quality", "shaping", "masking_margin_db", "masking_exponent")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Loss weights: sign-PGD is invariant to a common scale, but float32 is not: a weight of 1e308 turns the loss into
# inf (NaN gradient, no step) and one of 5e-324 into 0 (zero gradient, no step). Both came back "OK" with an
# unchanged output, so weights are held to a range where every loss term keeps its gradient.
MAX_WEIGHT = 1e6
MIN_POSITIVE_WEIGHT = 1e-6


class InvalidInput(ValueError):
    """The request is malformed; the message names the problem (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    max_seconds: float = 600.0
    max_upload_bytes: int = 1 << 30
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    min_seconds: float = MIN_SECONDS


@dataclass(frozen=True)
class Upload:
    """A validated header: what the PCM must look like."""

    sample_rate: int
    channels: int
    frames: int
    encoding: int
    sha256: str
    config: ProtectConfig

    @property
    def dtype(self) -> np.dtype:
        return ENCODINGS[self.encoding][1]

    @property
    def nbytes(self) -> int:
        return self.frames * self.channels * self.dtype.itemsize


def settings_to_config(s: pb.ProtectSettings) -> ProtectConfig:
    """ProtectConfig from wire settings; unset fields take ProtectConfig's defaults."""
    values: dict[str, object] = {}
    for name in _SCALAR_FIELDS:
        if s.HasField(name):
            v = getattr(s, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidInput(f"settings.{name} must be a finite number, got {v}")
            values[name] = v
    if len(s.weights):
        if len(s.weights) != 4:
            raise InvalidInput(f"settings.weights must be empty (defaults) or exactly 4 numbers (id, ctx, score, sem), "
                               f"got {len(s.weights)}")
        for i, (term, w) in enumerate(zip(LOSS_NAMES, s.weights, strict=True)):
            if not math.isfinite(w):
                raise InvalidInput(f"settings.weights[{i}] ({term}) must be a finite number, got {w}")
            if w > MAX_WEIGHT or 0 < w < MIN_POSITIVE_WEIGHT:
                raise InvalidInput(f"settings.weights[{i}] ({term}) = {w:g}: each weight must be 0 or in "
                                   f"[{MIN_POSITIVE_WEIGHT:g}, {MAX_WEIGHT:g}]")
        values["weights"] = tuple(s.weights)
    if len(s.id_encoders):
        bad = [e for e in s.id_encoders if e not in ENCODERS]
        if bad:
            raise InvalidInput(f"settings.id_encoders: unknown value(s) {bad}; use SPEAKER_ENCODER_GE2E / _WAVLM")
        values["id_encoders"] = tuple(dict.fromkeys(ENCODERS[e] for e in s.id_encoders))
    if s.gender not in GENDERS:
        raise InvalidInput(f"settings.gender: unknown value {s.gender}")
    if GENDERS[s.gender] is not None:
        values["gender"] = GENDERS[s.gender]
    if len(s.losses):
        bad = [e for e in s.losses if e not in LOSSES]
        if bad:
            raise InvalidInput(f"settings.losses: unknown value(s) {bad}; use LOSS_TERM_ID/_CTX/_SCORE/_SEM")
        values["losses"] = tuple(dict.fromkeys(LOSSES[e] for e in s.losses))
    try:
        cfg = ProtectConfig(**values)
    except ConfigError as e:
        raise InvalidInput(f"settings.{e}") from e
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"settings: {e}") from e
    if not any(w > 0 for w in cfg.loss_weights.values()):
        raise InvalidInput(f"settings.weights: no enabled loss term has a positive weight (weights "
                           f"{dict(zip(LOSS_NAMES, cfg.weights, strict=True))}, enabled terms "
                           f"{list(cfg.losses)}): nothing would be optimised and the output would not be protected")
    return cfg


def config_to_settings(cfg: ProtectConfig) -> pb.ProtectSettings:
    """Every field set explicitly (for echoing effective settings and the server's defaults)."""
    s = pb.ProtectSettings(
        weights=list(cfg.weights),
        id_encoders=[ENCODER_ENUM[e] for e in cfg.id_encoders],
        gender=GENDER_ENUM[cfg.gender],
        losses=[LOSS_ENUM[k] for k in cfg.losses],
    )
    for name in _SCALAR_FIELDS:
        setattr(s, name, getattr(cfg, name))
    return s


def check_settings_cover_config() -> None:
    """Fail loudly if ProtectConfig grows a field the wire format does not carry (checked by the tests)."""
    carried = set(_SCALAR_FIELDS) | {"weights", "id_encoders", "gender", "losses"}
    missing = {f.name for f in fields(ProtectConfig)} - carried
    if missing:
        raise AssertionError(f"ProtectSettings does not carry ProtectConfig field(s) {sorted(missing)}")


def validate_header(h: pb.ProtectHeader, limits: Limits) -> Upload:
    if not MIN_SAMPLE_RATE <= h.sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidInput(f"header.sample_rate: {h.sample_rate} Hz is outside the supported "
                           f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= h.channels <= MAX_CHANNELS:
        raise InvalidInput(f"header.channels: {h.channels} channels; 1..{MAX_CHANNELS} supported")
    if h.frames == 0:
        raise InvalidInput("header.frames: the audio is empty (0 frames)")
    seconds = h.frames / h.sample_rate
    if seconds < limits.min_seconds:
        raise InvalidInput(f"header.frames: {h.frames} frames at {h.sample_rate} Hz is {seconds:.3f} s; "
                           f"at least {limits.min_seconds} s is needed")
    if seconds > limits.max_seconds:
        raise InvalidInput(f"header.frames: {h.frames} frames at {h.sample_rate} Hz is {seconds:.1f} s; this server "
                           f"accepts at most {limits.max_seconds:g} s")
    if h.encoding not in ENCODINGS:
        raise InvalidInput(f"header.encoding: must be SAMPLE_ENCODING_FLOAT32 or SAMPLE_ENCODING_INT16, "
                           f"got {h.encoding}")
    if not _HEX64.fullmatch(h.sha256):
        raise InvalidInput("header.sha256: must be the SHA-256 of the PCM bytes as 64 lowercase hex digits")
    config = settings_to_config(h.settings)
    up = Upload(int(h.sample_rate), int(h.channels), int(h.frames), int(h.encoding), h.sha256, config)
    if up.nbytes > limits.max_upload_bytes:
        raise InvalidInput(f"header: the upload would be {up.nbytes} bytes; this server accepts at most "
                           f"{limits.max_upload_bytes}")
    return up


class Receiver:
    """Collects PCM chunks for an upload, checking sizes as they come and the checksum at the end."""

    def __init__(self, upload: Upload, limits: Limits) -> None:
        self.up = upload
        self.limits = limits
        self.buf = bytearray()
        self.hash = hashlib.sha256()
        self.chunks = 0

    def add(self, data: bytes) -> None:
        self.chunks += 1
        if len(data) > self.limits.max_chunk_bytes:
            raise InvalidInput(f"pcm chunk {self.chunks} is {len(data)} bytes; at most {self.limits.max_chunk_bytes} "
                               "bytes per chunk")
        if len(self.buf) + len(data) > self.up.nbytes:
            up = self.up
            raise InvalidInput(f"pcm chunk {self.chunks}: more PCM than the header declares ({up.frames} frames x "
                               f"{up.channels} channels x {up.dtype.itemsize} bytes = {up.nbytes} bytes)")
        self.buf += data
        self.hash.update(data)

    def finish(self) -> np.ndarray:
        """The samples as float32 (frames,) or (frames, channels), checked; raises InvalidInput."""
        if len(self.buf) < self.up.nbytes:
            raise InvalidInput(f"the stream ended after {len(self.buf)} of {self.up.nbytes} PCM bytes "
                               "(truncated upload)")
        digest = self.hash.hexdigest()
        if digest != self.up.sha256:
            raise InvalidInput(f"sha256 mismatch: the header says {self.up.sha256}, the PCM bytes hash to {digest}")
        arr = np.frombuffer(self.buf, dtype=self.up.dtype).reshape(self.up.frames, self.up.channels)
        self.buf = bytearray()  # the view keeps the received bytes alive until they are converted
        if self.up.channels == 1:
            arr = arr[:, 0]
        if not arr.dtype.isnative:  # big-endian hosts only; elsewhere the view is converted directly
            arr = arr.astype(arr.dtype.newbyteorder("="))
        try:
            # one new float32 array: the peak is the received bytes + the samples (what the budget holds)
            return validate_samples(arr, self.up.sample_rate, name="pcm", min_seconds=self.limits.min_seconds,
                                    max_seconds=self.limits.max_seconds)
        except AudioError as e:
            raise InvalidInput(str(e)) from e


def encode(audio: np.ndarray, encoding: int, reference: np.ndarray | None = None, epsilon: float = 0.0) -> bytes:
    """PCM bytes of float32 audio in the wire encoding. For int16 the output is quantised onto the 16-bit grid
    within +-epsilon of `reference` (the input, which was on that grid): the budget holds on what is stored."""
    if encoding == pb.SAMPLE_ENCODING_FLOAT32:
        return np.ascontiguousarray(audio, dtype="<f4").tobytes()
    full = 32768.0
    q = np.rint(audio.astype(np.float64) * full)
    if reference is not None:
        x = reference.astype(np.float64) * full
        lo, hi = np.ceil(x - epsilon * full), np.floor(x + epsilon * full)
        q = np.clip(q, lo, hi)
    return np.clip(q, -full, full - 1).astype("<i2").tobytes()


def decode(data: bytes, encoding: int, channels: int) -> np.ndarray:
    """float32 samples, (frames,) for mono and (frames, channels) otherwise."""
    dtype = ENCODINGS[encoding][1]
    raw = np.frombuffer(data, dtype=dtype)
    x = raw.astype(np.float32) / 32768.0 if encoding == pb.SAMPLE_ENCODING_INT16 else raw.astype(np.float32)
    return x if channels == 1 else x.reshape(-1, channels)


def delivered_linf(data: bytes, encoding: int, reference: np.ndarray, block: int = 1 << 20) -> float:
    """max |decoded output - reference| over the PCM as sent (int16 rounding included), in blocks of `block`
    samples so that a long clip needs no second full-size float copy."""
    ref = reference.reshape(-1)
    itemsize = ENCODINGS[encoding][1].itemsize
    worst = 0.0
    for off in range(0, ref.shape[0], block):
        part = decode(data[off * itemsize:(off + block) * itemsize], encoding, 1)
        worst = max(worst, float(np.max(np.abs(part - ref[off:off + block]))))
    return worst


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
