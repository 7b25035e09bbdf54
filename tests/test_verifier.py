"""The shipped black-box speaker verifier: strict loading, real speaker separation on corpus speech, the EER
trials, and its training recipe (determinism, exact resume, export that loads)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, need_data

from cloak.evaluate.metrics import compute_eer
from cloak.models.verifier import (
    DEFAULT_PATH,
    FORMAT,
    SpeakerVerifier,
    VerifierConfig,
    VerifierLoadError,
    load_verifier,
)
from cloak.train import verifier as T


@pytest.fixture(scope="module")
def shipped() -> SpeakerVerifier:
    return load_verifier()


def _read(path: Path) -> torch.Tensor:
    return T.read_16k(path)


# ------------------------------------------------------------------------------------------- the shipped file


def test_shipped_file_loads_strict_and_fits_the_budget(shipped):
    assert DEFAULT_PATH.is_file() and DEFAULT_PATH.stat().st_size <= 10 * 2**20
    ckpt = torch.load(DEFAULT_PATH, weights_only=True)
    assert ckpt["format"] == FORMAT == "voicecloak-verifier-1"
    assert VerifierConfig.from_dict(ckpt["config"]) == shipped.config
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert len(shipped.checksum or "") == 64 and not shipped.training
    assert not any(p.requires_grad for p in shipped.parameters())
    # the threshold travels with the weights: an EER threshold on held-out corpus-train speakers
    cal = shipped.calibration
    assert 0.0 < shipped.threshold < 1.0 and 0.0 <= cal["eer"] < 0.5 and cal["n_target"] > 50
    assert not set(cal["speakers"]) & {p.name for p in CORPUS.iterdir()} if CORPUS.is_dir() else True
    assert ckpt["meta"]["train_dir"] == "shared/corpus-train"


def test_loading_is_strict_and_names_the_problem(tmp_path):
    ckpt = torch.load(DEFAULT_PATH, weights_only=True)
    key = sorted(ckpt["state_dict"])[3]

    def write(obj, name):
        p = tmp_path / name
        torch.save(obj, p)
        return p

    missing = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != key})
    with pytest.raises(VerifierLoadError, match="missing keys") as e:
        load_verifier(write(missing, "missing.pt"))
    assert key in str(e.value)
    extra = dict(ckpt, state_dict=dict(ckpt["state_dict"], **{"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(VerifierLoadError, match=r"unexpected keys \['model.extra.weight'\]"):
        load_verifier(write(extra, "extra.pt"))
    wide = dict(ckpt, config=dict(ckpt["config"], channels=ckpt["config"]["channels"] * 2))
    with pytest.raises(VerifierLoadError, match="shape mismatches"):
        load_verifier(write(wide, "wide.pt"))
    with pytest.raises(VerifierLoadError, match="format"):
        load_verifier(write(dict(ckpt, format="voicecloak-verifier-0"), "old.pt"))
    with pytest.raises(VerifierLoadError, match="unknown keys"):
        load_verifier(write(dict(ckpt, config=dict(ckpt["config"], depth=3)), "cfg.pt"))
    with pytest.raises(VerifierLoadError, match="threshold"):
        load_verifier(write(dict(ckpt, calibration={}), "cal.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VerifierLoadError, match="not a readable"):
        load_verifier(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_verifier(tmp_path / "absent.pt")


def test_same_speaker_closer_than_other_speakers_on_real_speech(shipped):
    """Two utterances of each of 4 corpus speakers (VCTK and LibriSpeech, none seen in training): every
    same-speaker pair scores above every different-speaker pair."""
    speakers = ("vctk_p226", "vctk_p228", "librispeech_1688", "librispeech_2033")
    emb, labels = [], []
    for spk in speakers:
        for f in sorted(need_data(CORPUS / spk, f"corpus speaker {spk}").iterdir())[:2]:
            emb.append(shipped.embed(_read(f)[None])[0].numpy())
            labels.append(spk)
    e = np.stack(emb)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    tar, non = T.pair_trials(e, labels)
    assert len(tar) == 4 and len(non) == 24
    assert min(tar) > max(non) and min(tar) > np.mean(non) + 0.3  # measured: 0.67 vs at most 0.40, mean 0.15
    assert compute_eer(tar, non).eer == 0.0
    assert min(tar) >= shipped.threshold  # every same-speaker pair accepted at the shipped threshold
    # the embedding is a differentiable function of the waveform (the SpeakerEncoder interface)
    x = _read(sorted((CORPUS / speakers[0]).iterdir())[0])[: 16000 * 2].clone().requires_grad_(True)
    shipped.embed(x[None]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- trials


def test_pair_and_enrollment_trials_and_eer_on_a_toy_case():
    # three speakers, two unit vectors each: every unordered pair counted once, same-speaker pairs as targets
    e = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [0.6, -0.8], [0.8, -0.6]])
    tar, non = T.pair_trials(e * np.array([[2.0], [1.0], [3.0], [1.0], [1.0], [0.5]]), list("aabbcc"))  # any norm
    assert sorted(tar) == pytest.approx([0.8, 0.8, 0.96])
    assert len(non) == 12 and sorted(non)[-2:] == pytest.approx([0.8, 0.96])  # a1.b0 = 0.8, a1.b1 = 0.96
    # four targets and four non-targets overlapping by one on each side: EER 1/4 at the midpoint threshold
    res = compute_eer([0.5, 0.7, 0.9, 0.95], [0.1, 0.3, 0.6, 0.8])
    assert res.eer == pytest.approx(0.25) and res.threshold == pytest.approx(0.65)
    assert res.far_at_threshold == res.frr_at_threshold == 0.25
    separable = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    tar, non = T.pair_trials(separable, ["a", "a", "b", "b"])
    sep = compute_eer(tar, non)
    assert sep.eer == 0.0 and max(non) < sep.threshold <= min(tar)
    # enrollment trials: a row against the mean of its speaker's other rows, and every other speaker's mean
    tar, non = T.enrollment_trials(separable, ["a", "a", "b", "b"])
    assert len(tar) == 4 and len(non) == 4
    assert tar[0] == pytest.approx(float(separable[0] @ separable[1] / np.linalg.norm(separable[1])))
    assert compute_eer(tar, non).eer == 0.0
    assert compute_eer([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]).eer == pytest.approx(0.5)  # no separation at all


def test_segments_cover_long_files_and_keep_short_ones():
    x = torch.arange(100)
    assert [len(s) for s in T.segments(x, 30)] == [30, 30, 30]
    assert [len(s) for s in T.segments(x, 60)] == [60]
    assert [len(s) for s in T.segments(x[:20], 30)] == [20]


# ------------------------------------------------------------------------------------------------ recipe


def _corpus(root: Path) -> Path:
    for spk in ("vctk_p226", "vctk_p227", "vctk_p228", "librispeech_1688", "librispeech_533"):
        d = root / spk
        d.mkdir(parents=True)
        for f in sorted(need_data(CORPUS / spk, f"corpus speaker {spk}").iterdir())[:2]:
            (d / f.name).symlink_to(f)
    shutil.copy(CORPUS / "SOURCES.md", root / "SOURCES.md")
    return root


ST = T.VerifierSettings(holdout=2, channels=16, embedding_dim=8, n_mels=24, steps=4, batch=3, warmup=2,
                        crop_s=(0.5, 0.6), val_every=2)


def test_recipe_is_deterministic_resumes_exactly_and_exports(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    feats = T.prepare(corpus, tmp_path / "a", ST)
    data = torch.load(feats, weights_only=True)
    assert len(data["train_speakers"]) == 3 and len(data["holdout_speakers"]) == 2
    assert not set(data["train_speakers"]) & set(data["holdout_speakers"])
    assert {it["speed"] for it in data["items"]} == set(T.SPEEDS)
    slow = next(it for it in data["items"] if it["speed"] == 0.9)
    same = next(it for it in data["items"] if it["file"] == slow["file"] and it["speed"] == 1.0)
    assert slow["feats"].shape[0] > same["feats"].shape[0] and slow["label"] != same["label"]
    # batches depend on (seed, step) only
    b = T.Batches(data["items"], ST)
    x1, y1 = b(3)
    x2, y2 = T.Batches(data["items"], ST)(3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape[2] == ST.n_mels
    assert not torch.equal(x1, b(2)[0])

    straight = T.train(corpus, tmp_path / "a", ST, budget_s=1e9, checkpoint_s=1e9, use_bf16=False)
    assert straight is not None
    (tmp_path / "b").mkdir()
    shutil.copy(feats, tmp_path / "b" / "features.pt")
    # stopped after 2 steps, then resumed: the same weights as the straight run
    assert T.train(corpus, tmp_path / "b", ST, budget_s=1e9, checkpoint_s=1e9, use_bf16=False, stop_after=2) is None
    assert torch.load(tmp_path / "b" / "train.pt", weights_only=True)["step"] == 2
    with pytest.raises(SystemExit, match="other settings"):
        T.train(corpus, tmp_path / "b", replace(ST, lr=1e-3), budget_s=1e9, checkpoint_s=1e9, use_bf16=False)
    resumed = T.train(corpus, tmp_path / "b", ST, budget_s=1e9, checkpoint_s=1e9, use_bf16=False)
    assert resumed is not None
    s1 = torch.load(straight, weights_only=True)["model"]
    s2 = torch.load(resumed, weights_only=True)["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)

    out = tmp_path / "verifier.pt"
    report = T.export(corpus, corpus, tmp_path / "a", out, ST)
    model = load_verifier(out)
    assert model.config == ST.model_config() and model.threshold == report["calibration"]["threshold"]
    assert set(report["evaluation"]) >= {"all", "validation"}
    assert report["evaluation"]["all"]["files"] == 10 and 0 <= report["evaluation"]["all"]["pairs"]["eer"] <= 1
