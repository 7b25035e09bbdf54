"""The cloak.v1 wire format both sides use (server.wire): settings both ways, PCM both ways."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pytest

pytest.importorskip("google.protobuf")

from cloak import ProtectConfig  # noqa: E402
from cloak.audio import fit_to_budget  # noqa: E402
from server import wire  # noqa: E402
from server.gen import cloak_service_pb2 as pb  # noqa: E402

# Every ProtectConfig field at a valid value that is not its default: a field added to ProtectConfig must be added
# here, and then round-trips through the wire only when both directions carry it.
NON_DEFAULT: dict[str, Any] = {
    "epsilon": 0.003, "step_size": 1e-4, "iterations": 3, "repeats": 2, "t_adv": 3,
    "weights": (1.0, 2.0, 3.0, 4.0, 0.5),
    "seed": 9, "id_encoders": ("wavlm", "ge2e"), "gender": "female", "losses": ("id", "sem"), "source_frames": 48,
    "window_seconds": 3.0, "overlap_seconds": 0.5, "inference_steps": 50, "early_stop": True, "early_stop_every": 3,
    "early_stop_identity_drop": 0.25, "early_stop_quality": 3.0, "shaping": "none", "masking_margin_db": 30.0,
    "masking_exponent": 0.75, "random_start": True, "eot": ("resample", "mp3"), "quality_target": 4.2,
}


def test_every_protect_config_field_crosses_the_wire_both_ways():
    assert set(NON_DEFAULT) == {f.name for f in fields(ProtectConfig)}, "list the new field in NON_DEFAULT"
    default = ProtectConfig()
    assert all(getattr(default, k) != v for k, v in NON_DEFAULT.items())
    cfg = ProtectConfig(**NON_DEFAULT)
    assert wire.uncarried_fields() == []
    assert wire.settings_to_config(wire.config_to_settings(cfg)) == cfg
    for name, value in NON_DEFAULT.items():  # one at a time: no field is carried only by way of another
        one = ProtectConfig(**{name: value})
        assert wire.settings_to_config(wire.config_to_settings(one)) == one, name


def test_unset_settings_are_the_defaults():
    assert wire.settings_to_config(pb.ProtectSettings()) == ProtectConfig()
    assert wire.config_to_settings(ProtectConfig()) == wire.config_to_settings(
        wire.settings_to_config(pb.ProtectSettings()))


def test_bad_settings_name_the_field():
    with pytest.raises(wire.InvalidInput, match=r"settings\.weights\[1\] \(ctx\)"):
        wire.settings_to_config(pb.ProtectSettings(weights=[1, float("nan"), 1, 1]))
    with pytest.raises(wire.InvalidInput, match=r"settings\.epsilon"):
        wire.settings_to_config(pb.ProtectSettings(epsilon=5.0))
    with pytest.raises(wire.InvalidInput, match=r"settings\.weights\[4\] \(voice\)"):
        wire.settings_to_config(pb.ProtectSettings(weights=[1, 1, 1, 1, 1e9]))
    with pytest.raises(wire.InvalidInput, match=r"settings\.eot: unknown value"):
        wire.settings_to_config(pb.ProtectSettings(eot=[pb.EOT_TRANSFORM_MP3, 7]))
    with pytest.raises(wire.InvalidInput, match=r"settings\.weights must be empty .* got 3"):
        wire.settings_to_config(pb.ProtectSettings(weights=[1, 1, 1]))
    # four numbers (a client written before L_voice): the voice weight keeps its default
    assert wire.settings_to_config(pb.ProtectSettings(weights=[1, 2, 3, 4])).weights == (1.0, 2.0, 3.0, 4.0, 10.0)


def test_pcm_round_trips_in_both_encodings():
    rng = np.random.default_rng(0)
    stereo = (rng.uniform(-1, 1, (100, 2))).astype(np.float32)
    f32 = wire.encode(stereo, pb.SAMPLE_ENCODING_FLOAT32)
    assert np.array_equal(wire.decode(f32, pb.SAMPLE_ENCODING_FLOAT32, 2), stereo)
    grid = (rng.integers(-32768, 32768, 200) / 32768).astype(np.float32)
    i16 = wire.encode(grid, pb.SAMPLE_ENCODING_INT16)
    assert np.frombuffer(i16, "<i2").tolist() == np.rint(grid.astype(np.float64) * 32768).astype(int).tolist()
    assert np.array_equal(wire.decode(i16, pb.SAMPLE_ENCODING_INT16, 1), grid)
    assert np.frombuffer(wire.encode(np.array([1.0, -1.0], np.float32), pb.SAMPLE_ENCODING_INT16), "<i2").tolist() \
        == [32767, -32768]  # full scale clipped onto the grid


def test_int16_output_keeps_the_budget_as_stored():
    rng = np.random.default_rng(1)
    eps = 0.002
    x = (rng.integers(-20000, 20000, 5000) / 32768).astype(np.float32)  # an int16 input
    out = np.clip(x + rng.uniform(-eps, eps, x.shape), -1, 1).astype(np.float32)  # float32 output at the edge
    naive = np.rint(out.astype(np.float64) * 32768) / 32768
    assert np.abs(naive - x).max() > eps  # rounding to nearest alone steps past the budget here
    stored = wire.decode(wire.encode(out, pb.SAMPLE_ENCODING_INT16, reference=x, epsilon=eps),
                         pb.SAMPLE_ENCODING_INT16, 1)
    assert np.abs(stored.astype(np.float64) - x).max() <= eps
    assert np.array_equal(stored, fit_to_budget(out, x, eps, "PCM_16"))  # the one budget-keeping rounding
