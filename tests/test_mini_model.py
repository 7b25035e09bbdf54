"""The embedded cloak-mini model: it ships, loads by default, and really clones (issue acceptance, one pair)."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS

from cloak.bundle import EMBEDDED_DIFFVC
from cloak.train.mini import MINI_CONFIG, VAL_SPEAKERS

pytestmark = pytest.mark.skipif(not EMBEDDED_DIFFVC.is_file(), reason=f"{EMBEDDED_DIFFVC} is not built yet")


def test_embedded_checkpoint_is_the_documented_config_and_small():
    from cloak.models.prior import PriorConfig
    from cloak.train.prior import FORMAT

    ck = torch.load(EMBEDDED_DIFFVC, weights_only=True)
    assert ck["format"] == FORMAT and ck["meta"]["format"] == FORMAT
    assert ck["config"] == MINI_CONFIG.to_dict()
    assert PriorConfig.from_dict(ck["prior_config"]).vtl_exponent > 0
    assert ck["meta"]["name"] == "cloak-mini" and ck["meta"]["decoder_steps"] > 0
    assert ck["meta"]["prior_steps"] > 0 and ck["meta"]["decoder_finetune_steps"] > 0
    assert EMBEDDED_DIFFVC.stat().st_size <= 40 * 2**20


def test_load_models_defaults_to_cloak_mini():
    from cloak import load_models

    m = load_models()
    assert m.diffvc.config == MINI_CONFIG
    assert m.info[0].name == "diffvc:cloak-mini"
    assert m.prior is not None  # cloak-mini 2: the speaker-adaptive prior loads with it


def test_one_unseen_pair_clones_toward_the_reference(corpus):
    """The first pair of `python -m cloak.train.acceptance` (male source 2414, female reference 3080, both unseen
    in training, first utterance of each): the clone is closer to the reference speaker than to the source, and
    at least 0.15 closer to the reference than the source itself is (measured 0.762 vs 0.551 to the source, whose
    own cosine to the reference is 0.536). Two first-utterance clones toward vctk_p225 still fail this
    (MODEL_CARD.md: 10 of 12 acceptance pairs pass)."""
    pytest.importorskip("cloak.models.hifigan")
    from cloak import load_models
    from cloak.audio import read_audio, to_mono
    from cloak.train.acceptance import clone_pair_scores, embed_wave, enrollment

    models = load_models()
    src_spk, ref_spk = VAL_SPEAKERS[2], VAL_SPEAKERS[1]  # male source, female reference: both unseen in training
    src_files = sorted((CORPUS / src_spk).iterdir())
    ref_files = sorted((CORPUS / ref_spk).iterdir())

    def enroll(files, skip):
        return enrollment([embed_wave(models, to_mono(read_audio(f).samples), read_audio(f).sample_rate)
                        for f in files[:5] if f != skip])

    s = clone_pair_scores(models, src_files[0], ref_files[0], enroll(src_files, src_files[0]),
                          enroll(ref_files, ref_files[0]), steps=30)
    assert s["clone_vs_ref"] > s["clone_vs_src"], s
    assert s["clone_vs_ref"] >= s["source_vs_ref"] + 0.15, s
