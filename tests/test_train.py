"""cloak-mini training on a small real corpus: the split, determinism and exact resume, export that loads."""

from __future__ import annotations

import shutil
from dataclasses import replace

import torch
from conftest import CORPUS, need_data

from cloak.train import mini
from cloak.train.mini import TrainSettings

# the decoder's 4 steps pass through every stage of the recipe: mild mean perturbation (step 0), strong (1),
# strong + late-t emphasis (2), + the long-term-spectrum term (3), so the resume below checks them all
ST = TrainSettings(enc_steps=2, enc_batch=2, enc_frames=32, dec_steps=4, dec_batch=2, dec_frames=32, ckpt_every=2,
                   strong_mean_from=1, late_t_from=2, spectrum_from=3)


def _corpus(root):
    for spk, n in (("vctk_p226", 2), ("vctk_p228", 2), ("vctk_p225", 1)):  # p225 is a validation speaker
        d = root / spk
        d.mkdir(parents=True)
        for f in sorted(need_data(CORPUS / spk, f"corpus speaker {spk}").iterdir())[:n]:
            (d / f.name).symlink_to(f)
    shutil.copy(CORPUS / "SOURCES.md", root / "SOURCES.md")
    return root


def test_split_resume_and_export(tmp_path):
    data = mini.prepare([_corpus(tmp_path / "corpus")], tmp_path / "a")
    items = torch.load(data, weights_only=False)
    splits = {(it["speaker"], it["split"]) for it in items}
    assert ("vctk_p225", "val_unseen") in splits and not any(s == "vctk_p225" and p == "train" for s, p in splits)
    assert {("vctk_p226", "train"), ("vctk_p226", "val_seen")} <= splits
    assert all(it["mel"].shape[0] == 80 and it["dvec"].shape == (256,) for it in items)

    # the pack that carries the data to a GPU machine: 8-bit log-mels (+ one step of dither), same split and d-vectors
    packed = mini.load_items(mini.pack(items, tmp_path / "pack.pt"))
    step = (mini.PACK_HI - mini.PACK_LO) / 255
    for it, pk in zip(items, packed, strict=True):
        assert pk["split"] == it["split"] and pk["speaker"] == it["speaker"]
        assert (pk["mel"] - it["mel"].clamp(mini.PACK_LO, mini.PACK_HI)).abs().max() <= step + 1e-5
        assert torch.allclose(pk["dvec"], it["dvec"], atol=1e-3)

    # run A: straight through
    a = tmp_path / "a"
    mini.train_encoder(items, a, ST, 1e9)
    mini.compute_means(items, a)
    mini.train_decoder(items, a, ST, 1e9)
    # run B: the same, stopped after half of each stage and resumed from its checkpoints
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(data, b / "data.pt")
    mini.train_encoder(items, b, replace(ST, enc_steps=1), 1e9)
    mini.train_encoder(items, b, ST, 1e9)
    mini.compute_means(items, b)
    mini.train_decoder(items, b, replace(ST, dec_steps=2), 1e9)
    mini.train_decoder(items, b, ST, 1e9)

    ea, eb = (torch.load(d / "encoder.pt", weights_only=False) for d in (a, b))
    assert ea["step"] == eb["step"] == 2
    assert all(torch.equal(ea["encoder"][k], eb["encoder"][k]) for k in ea["encoder"])
    da, db = (torch.load(d / "decoder.pt", weights_only=False) for d in (a, b))
    assert da["step"] == db["step"] == 4
    assert all(torch.equal(da["decoder"][k], db["decoder"][k]) for k in da["decoder"])
    assert all(torch.equal(da["ema"][k], db["ema"][k]) for k in da["ema"])
    assert not all(torch.equal(da["ema"][k], da["decoder"][k]) for k in da["ema"])  # the EMA lags the weights
    logged = (a / "decoder_log.jsonl").read_text()  # logs every 25 steps: none yet at 4
    assert logged == ""

    # the conditioning probe: a decoder whose condition vector is cut off gains nothing from the right speaker
    from cloak.models import load_diffvc
    from cloak.train.probe import conditioning_use

    means = torch.load(a / "means.pt", weights_only=False)["means"]
    model = load_diffvc(str(mini.export(a, tmp_path / "probe" / "diffvc.pt", ST))).eval()
    used = conditioning_use(model, items, means, batches=1, batch=4, frames=32)
    assert set(used) == {"0.5-0.7", "0.7-0.85"}
    assert all(r["eps_right"] > 0 and r["spectrum_right"] > 0 and r["eps_gain"] != 0 for r in used.values())
    with torch.no_grad():
        model.decoder.estimator.cond_block[-1].weight.zero_()
    cut = conditioning_use(model, items, means, batches=1, batch=4, frames=32)
    assert all(r["eps_gain"] == 0 and r["spectrum_gain"] == 0 for r in cut.values())

    out = mini.export(a, tmp_path / "bundle" / "diffvc.pt", ST)
    ck = torch.load(out, weights_only=True)
    assert ck["meta"]["decoder_steps"] == 4 and ck["meta"]["decoder_weights"] == "ema"
    from cloak import load_models

    models = load_models(tmp_path / "bundle")
    assert models.diffvc.config == mini.MINI_CONFIG
    assert torch.equal(models.diffvc.decoder.estimator.final_conv.bias,
                       da["ema"]["estimator.final_conv.bias"])


def test_strong_mean_perturbation_randomises_the_timbre_the_mild_one_keeps():
    """The decoder must not be able to read the voice off its prior mean: over many draws the strong perturbation
    moves a mean's long-term spectrum (the timbre) by far more than the mild one; the mild one draws exactly as
    before (same random stream, same values), so checkpoints before `strong_mean_from` resume bit for bit."""
    import random

    n, t = 80, 64
    mean = torch.linspace(-2.0, -8.0, n)[:, None].repeat(1, t) + 0.3 * torch.sin(torch.arange(t) / 5.0)
    mask = torch.ones(1, t)

    def timbre_spread(**kw):
        rng = random.Random(0)
        profiles = torch.stack([mini.perturb_mean(mean, mask, rng, **kw).mean(1) for _ in range(200)])
        return float((profiles - mean.mean(1)).std(0).mean())

    mild, strong = timbre_spread(), timbre_spread(**mini.STRONG_PERTURBATION)
    assert strong > 1.5 * mild
    r1, r2 = random.Random(5), random.Random(5)
    a = mini.perturb_mean(mean, mask, r1)
    alpha, gain = 1.0 + r2.uniform(-0.15, 0.15), r2.uniform(-1.0, 1.0)
    pos = (torch.arange(n, dtype=mean.dtype) * alpha).clamp(0, n - 1)
    lo = pos.floor().long()
    w = (pos - lo)[:, None]
    expected = (mean[lo] * (1 - w) + mean[(lo + 1).clamp(max=n - 1)] * w + gain) * mask
    assert torch.allclose(a, expected)
    assert r1.random() == r2.random()
