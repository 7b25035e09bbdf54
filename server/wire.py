"""The cloak.v1 wire format shared by the client (clients.remote) and the server (server.pcm): ProtectConfig <->
ProtectSettings in both directions, and PCM bytes <-> float32 samples with the budget-preserving int16 rounding
(server.codec's, by encoding name; here by cloak.v1.SampleEncoding).

Both sides translate through this module only, so a ProtectConfig field is either carried both ways or by neither
(`uncarried_fields` names those that are not; the tests hold it empty). Needs protobuf, not grpcio.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from cloak import ConfigError, ProtectConfig
from cloak.config import LOSS_NAMES, PAPER_LOSSES

from . import codec
from .gen import cloak_service_pb2 as pb

ENCODINGS: dict[int, tuple[str, np.dtype]] = {
    pb.SAMPLE_ENCODING_FLOAT32: ("float32", codec.DTYPES["float32"]),
    pb.SAMPLE_ENCODING_INT16: ("int16", codec.DTYPES["int16"]),
}
ENCODING_ENUM = {name: k for k, (name, _) in ENCODINGS.items()}
GENDERS = {pb.GENDER_UNSPECIFIED: None, pb.GENDER_AUTO: "auto", pb.GENDER_FEMALE: "female", pb.GENDER_MALE: "male"}
GENDER_ENUM = {"auto": pb.GENDER_AUTO, "female": pb.GENDER_FEMALE, "male": pb.GENDER_MALE}
ENCODERS = {pb.SPEAKER_ENCODER_GE2E: "ge2e", pb.SPEAKER_ENCODER_WAVLM: "wavlm"}
ENCODER_ENUM = {v: k for k, v in ENCODERS.items()}
LOSSES = {pb.LOSS_TERM_ID: "id", pb.LOSS_TERM_CTX: "ctx", pb.LOSS_TERM_SCORE: "score", pb.LOSS_TERM_SEM: "sem",
          pb.LOSS_TERM_VOICE: "voice"}
LOSS_ENUM = {v: k for k, v in LOSSES.items()}
EOTS = {pb.EOT_TRANSFORM_MP3: "mp3", pb.EOT_TRANSFORM_RESAMPLE: "resample", pb.EOT_TRANSFORM_GAIN: "gain"}
EOT_ENUM = {v: k for k, v in EOTS.items()}
# ProtectConfig fields carried as optional scalars of the same name
SCALAR_FIELDS = ("epsilon", "step_size", "iterations", "repeats", "t_adv", "seed", "source_frames", "window_seconds",
                 "overlap_seconds", "inference_steps", "early_stop", "early_stop_every", "early_stop_identity_drop",
                 "early_stop_quality", "shaping", "masking_margin_db", "masking_exponent", "random_start",
                 "quality_target")
ENUM_FIELDS = ("weights", "id_encoders", "gender", "losses", "eot")
# Loss weights: sign-PGD is invariant to a common scale, but float32 is not: a weight of 1e308 turns the loss into
# inf (NaN gradient, no step) and one of 5e-324 into 0 (zero gradient, no step). Both came back "OK" with an
# unchanged output, so weights are held to a range where every loss term keeps its gradient.
MAX_WEIGHT = 1e6
MIN_POSITIVE_WEIGHT = 1e-6


class InvalidInput(ValueError):
    """The request is malformed; the message names the problem (INVALID_ARGUMENT)."""


def uncarried_fields() -> list[str]:
    """ProtectConfig fields the wire format does not carry (the tests require none)."""
    carried = set(SCALAR_FIELDS) | set(ENUM_FIELDS)
    return sorted({f.name for f in fields(ProtectConfig)} - carried)


def settings_to_config(s: pb.ProtectSettings) -> ProtectConfig:
    """ProtectConfig from wire settings; unset fields take ProtectConfig's defaults. Raises InvalidInput."""
    values: dict[str, object] = {}
    for name in SCALAR_FIELDS:
        if s.HasField(name):
            v = getattr(s, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidInput(f"settings.{name} must be a finite number, got {v}")
            values[name] = v
    if len(s.weights):
        if len(s.weights) not in (len(PAPER_LOSSES), len(LOSS_NAMES)):
            raise InvalidInput(f"settings.weights must be empty (defaults), {len(LOSS_NAMES)} numbers "
                               f"({', '.join(LOSS_NAMES)}) or {len(PAPER_LOSSES)} (voice at its default), "
                               f"got {len(s.weights)}")
        for i, (term, w) in enumerate(zip(LOSS_NAMES, s.weights, strict=False)):
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
            raise InvalidInput(f"settings.losses: unknown value(s) {bad}; use LOSS_TERM_ID/_CTX/_SCORE/_SEM/_VOICE")
        values["losses"] = tuple(dict.fromkeys(LOSSES[e] for e in s.losses))
    if len(s.eot):
        bad = [e for e in s.eot if e not in EOTS]
        if bad:
            raise InvalidInput(f"settings.eot: unknown value(s) {bad}; use EOT_TRANSFORM_MP3/_RESAMPLE/_GAIN")
        values["eot"] = tuple(dict.fromkeys(EOTS[e] for e in s.eot))
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
    """Every field set explicitly (what a client sends; the server echoes effective settings and its defaults)."""
    s = pb.ProtectSettings(
        weights=list(cfg.weights),
        id_encoders=[ENCODER_ENUM[e] for e in cfg.id_encoders],
        gender=GENDER_ENUM[cfg.gender],
        losses=[LOSS_ENUM[k] for k in cfg.losses],
        eot=[EOT_ENUM[k] for k in cfg.eot],
    )
    for name in SCALAR_FIELDS:
        if getattr(cfg, name) is not None:  # None (masking_exponent: chosen per window) travels as unset
            setattr(s, name, getattr(cfg, name))
    return s


def encode(audio: np.ndarray, encoding: int, reference: np.ndarray | None = None, epsilon: float = 0.0) -> bytes:
    """PCM bytes of float32 audio in a cloak.v1.SampleEncoding (server.codec.encode)."""
    return codec.encode(audio, ENCODINGS[encoding][0], reference, epsilon)


def decode(data: bytes, encoding: int, channels: int) -> np.ndarray:
    """float32 samples of PCM in a cloak.v1.SampleEncoding, (frames,) for mono and (frames, channels) otherwise."""
    return codec.decode(data, ENCODINGS[encoding][0], channels)
