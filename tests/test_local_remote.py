"""Local and remote protection agree bit for bit, for every ProtectConfig setting at a non-default value.

Both protectors come from clients.cli.make_protector (the one way `cloak protect`, `cloak audacity` and `cloak
evaluate` get theirs): the local one on the tiny test models (with a tiny WavLM-SV, so that id_encoders can name it),
the remote one on an in-process server holding the same models. Every field of ProtectConfig is a case (found with
dataclasses.fields, so a new field fails here until NON_DEFAULT gives it a value); each runs a short protection
both ways and compares the arrays with np.array_equal, and the settings the server echoes with what was asked.
No field is tied to the machine that protects (ProtectConfig has no device setting), so every case is expected to
succeed both ways; none expects a server-side refusal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_server_helpers import one_thread, running, speech

from clients.cli import LocalProtector, Protector, RemoteTarget, ServerProtector, Settings, make_protector
from clients.cli import protector as cli_protector
from cloak import ProtectConfig

# the short protection every case starts from: one iteration, one draw per step, on a second of speech
BASE = ProtectConfig(iterations=1, repeats=1, t_adv=2, source_frames=32, gender="male")
SECONDS = 1.25  # two windows when window_seconds is 1

# field -> (a value that is neither ProtectConfig's default nor BASE's, other fields it needs to have an effect)
NON_DEFAULT: dict[str, tuple[Any, dict[str, Any]]] = {
    "epsilon": (0.004, {}),
    "step_size": (1e-4, {}),
    "iterations": (2, {}),
    "repeats": (2, {}),
    "t_adv": (3, {}),
    "weights": ((2.0, 4.5, 5.0, 0.5, 1.0), {}),
    "seed": (7, {}),
    "id_encoders": (("ge2e", "wavlm"), {}),
    "gender": ("female", {}),
    "losses": (("id", "ctx"), {}),
    "source_frames": (48, {}),
    "window_seconds": (1.0, {"overlap_seconds": 0.25}),
    "overlap_seconds": (0.25, {"window_seconds": 1.0}),
    "inference_steps": (50, {}),
    "shaping": ("none", {}),
    "masking_margin_db": (20.0, {}),
    "masking_exponent": (0.8, {}),
    "quality_target": (4.2, {}),
    # the attacker check runs once, after iteration 1 of 2, with criteria it meets (it costs seconds: once is
    # enough); the other early-stop settings are carried (see the echoed settings) on jobs too short for a check
    "early_stop": (True, {"iterations": 2, "early_stop_every": 1, "early_stop_identity_drop": 0.0,
                          "early_stop_quality": 4.9}),
    "early_stop_every": (5, {"early_stop": True}),
    "early_stop_identity_drop": (0.3, {"early_stop": True}),
    "early_stop_quality": (3.0, {"early_stop": True}),
    "random_start": (True, {}),
    "eot": (("mp3", "gain"), {"iterations": 2}),
}
FIELDS = [f.name for f in dataclasses.fields(ProtectConfig)]
# a WavLM-SV of the microsoft/wavlm-base-plus-sv layout, a few thousand weights
TINY_WAVLM = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48,
              "conv_dim": (16, 16), "conv_stride": (10, 8), "conv_kernel": (10, 8), "num_conv_pos_embeddings": 16,
              "num_conv_pos_embedding_groups": 4, "tdnn_dim": (16, 24), "tdnn_kernel": (3, 1), "tdnn_dilation": (1, 1),
              "xvector_output_dim": 16, "num_buckets": 32, "max_bucket_distance": 64, "do_stable_layer_norm": False}


def tiny_wavlm() -> Any:
    import torch
    import transformers

    from cloak.models.wavlm import WavLMSV

    torch.manual_seed(0)
    model = transformers.WavLMForXVector(transformers.WavLMConfig(**TINY_WAVLM))
    return WavLMSV(model.eval().requires_grad_(False), checksum="tiny").eval()


@pytest.fixture(scope="module")
def protectors(tiny_models: Any) -> Iterator[tuple[Protector, Protector]]:
    """(local, remote), made by make_protector; one server for every case."""
    models = dataclasses.replace(tiny_models, wavlm=tiny_wavlm())
    settings = Settings(config=BASE, models=None, models_source="test", device="cpu", config_file=None)
    with one_thread(), running(models) as srv, pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_protector, "load_models_for", lambda s: models)  # the test models, not a bundle's
        local = make_protector(settings, None)
        remote = make_protector(settings, RemoteTarget(srv.address, None, None))
        assert isinstance(local, LocalProtector) and isinstance(remote, ServerProtector)
        try:
            yield local, remote
        finally:
            remote.client.close()


def test_the_table_names_fields_only() -> None:
    assert set(NON_DEFAULT) <= set(FIELDS), f"stale entries: {sorted(set(NON_DEFAULT) - set(FIELDS))}"


@pytest.mark.parametrize("name", FIELDS)
def test_local_and_remote_agree_bit_for_bit(name: str, protectors: tuple[Protector, Protector]) -> None:
    assert name in NON_DEFAULT, f"ProtectConfig.{name} has no non-default test value: add one to NON_DEFAULT"
    value, needs = NON_DEFAULT[name]
    cfg = BASE.with_(**needs, **{name: value})
    assert getattr(cfg, name) != getattr(ProtectConfig(), name) and getattr(cfg, name) != getattr(BASE, name)
    audio = speech(SECONDS)
    local, remote = (p.protect(audio, 16000, cfg) for p in protectors)
    assert local.audio.dtype == remote.audio.dtype == np.float32 and local.audio.shape == audio.shape
    assert np.array_equal(local.audio, remote.audio)
    assert not np.array_equal(local.audio, audio)  # something was protected
    assert ProtectConfig.from_dict(remote.metrics["config"]) == cfg  # the server ran these settings
    assert remote.metrics["config"] == local.metrics["config"]
    assert remote.metrics["history"] == local.metrics["history"]  # the loss after every iteration run
    for key in ("masking_exponents", "predicted_pesq"):  # each window's shaping, as chosen on each side
        assert remote.metrics[key] == local.metrics[key] and len(local.metrics[key]) == local.metrics["windows"]
    if name == "early_stop":  # the check ran and stopped the window early (the same history on both sides)
        assert local.metrics["iterations_run"] == [1] and local.metrics["early_stop_checks"][0][0]["met"]
