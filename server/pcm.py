"""Uploads: header validation and the PCM receiver (the settings and PCM formats themselves are server.wire's,
the validated header a server.upload.Upload).

Every problem raises InvalidInput, whose message names the field or the message at fault; the servicer turns it
into INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from cloak import AudioError
from cloak.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, validate_samples

from .config import MAX_CHUNK_BYTES, MIN_SECONDS
from .gen import cloak_service_pb2 as pb
from .upload import Upload
from .wire import ENCODINGS, InvalidInput, settings_to_config

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Limits:
    max_seconds: float = 600.0
    max_upload_bytes: int = 1 << 30
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    min_seconds: float = MIN_SECONDS


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
    up = Upload(int(h.sample_rate), int(h.channels), int(h.frames), ENCODINGS[h.encoding][0], h.sha256, config)
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

