"""Model bundles (load_models) and the WavLM-SV speaker encoder path with a tiny model built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, corpus_clip, tiny_diffvc

from cloak import BundleError, ProtectConfig, load_models, protect
from cloak.bundle import sha256_file


def test_bundle_with_cloak_checkpoint_loads(tiny_bundle):
    m = load_models(tiny_bundle)
    ref = tiny_diffvc()
    for (k, a), (_, b) in zip(ref.state_dict().items(), m.diffvc.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    names = [i.name for i in m.info]
    assert names[:2] == ["diffvc", "ge2e"]
    assert m.info[0].sha256 == sha256_file(tiny_bundle / "diffvc.pt")


def test_official_raw_state_dict_needs_config_for_other_widths(tmp_path):
    d = tmp_path / "official"
    d.mkdir()
    torch.save(tiny_diffvc().state_dict(), d / "vc_libritts_wodyn.pt")
    with pytest.raises(BundleError, match="sha256"):
        load_models(d)  # read as the official full-size layout: mismatch, reported with the checksum
    (d / "diffvc.json").write_text(json.dumps(TINY))
    assert load_models(d).diffvc.config.dec_dim == TINY["dec_dim"]


def test_missing_and_mismatched_bundles_are_named(tmp_path, tiny_bundle, monkeypatch):
    with pytest.raises(BundleError, match="not found"):
        load_models(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no DiffVC checkpoint"):
        load_models(empty)
    (tiny_bundle / "SHA256SUMS").write_text("0" * 64 + "  diffvc.pt\n")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_models(tiny_bundle)
    (tiny_bundle / "SHA256SUMS").write_text(sha256_file(tiny_bundle / "diffvc.pt") + "  diffvc.pt\n")
    load_models(tiny_bundle)
    monkeypatch.setenv("CLOAK_MODELS", str(tmp_path / "gone"))
    with pytest.raises(BundleError, match="gone"):
        load_models()


@pytest.fixture()
def wavlm_bundle(tiny_bundle):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, tdnn_dim=(32, 32, 48),
                                   tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=24,
                                   num_buckets=32, max_bucket_distance=64, do_stable_layer_norm=False)
    torch.manual_seed(0)
    model = transformers.WavLMForXVector(cfg)
    model.save_pretrained(tiny_bundle / "wavlm-sv")
    (tiny_bundle / "wavlm-sv" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0}))
    return tiny_bundle


def test_wavlm_sv_embeds_differentiably_and_drives_l_id(wavlm_bundle):
    m = load_models(wavlm_bundle)
    assert m.wavlm is not None and any(i.name == "wavlm-sv" for i in m.info)
    x, sr = corpus_clip("vctk_p225", 0, seconds=1.0)
    w = torch.from_numpy(x)[None].requires_grad_(True)
    e = m.wavlm.embed(w)
    assert e.shape == (1, 24) and abs(float(e.norm()) - 1) < 1e-5
    e.sum().backward()
    assert w.grad.abs().sum() > 0
    cfg = ProtectConfig(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="female",
                        id_encoders=("ge2e", "wavlm"), losses=("id",))
    r = protect(x, sr, m, cfg)
    assert np.abs(r.audio - x).max() <= cfg.epsilon + 1e-7
    assert r.metrics["losses_end"]["id"] > 0


def test_wavlm_requested_without_model_is_a_clear_error(tiny_bundle):
    m = load_models(tiny_bundle)
    x, sr = corpus_clip("vctk_p225", 0, seconds=1.0)
    with pytest.raises(BundleError, match="wavlm"):
        protect(x, sr, m, ProtectConfig(iterations=1, repeats=1, id_encoders=("wavlm",)))
