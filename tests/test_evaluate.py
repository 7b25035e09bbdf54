"""`cloak evaluate`: every metric computed by the real library on real speech, the robustness transforms, the GE2E
EER calibration on the shared corpus, and a --quick run on a 2-speaker subset (report schema, plots, resume)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import CORPUS, corpus_clip, make_bundle, to_rate

from cloak.evaluate import metrics as M
from cloak.evaluate.transforms import TRANSFORMS

pytest.importorskip("onnxruntime")
pytest.importorskip("pesq")
pytest.importorskip("pystoi")


@pytest.fixture(scope="module")
def speech(corpus):
    x, sr = corpus_clip("vctk_p226", 1, seconds=3.0)
    return x, sr


@pytest.fixture(scope="module")
def dnsmos():
    return M.DNSMOS(threads=1)


# ----------------------------------------------------------------------------------------------- metrics


def test_pesq_stoi_mcd_snr_on_known_signals(speech):
    x, sr = speech
    rng = np.random.default_rng(0)
    assert M.pesq_wb(x, x, sr) == pytest.approx(M.PESQ_MAX, abs=0.01)  # the P.862.2 ceiling
    assert M.stoi(x, x, sr) == pytest.approx(1.0, abs=1e-4)
    assert M.mcd(x, x, sr) == 0.0
    noisy = (x + rng.normal(0, np.sqrt(np.mean(x**2)) / 10 ** (5 / 20), x.size)).astype(np.float32)  # 5 dB SNR
    assert M.pesq_wb(x, noisy, sr) < 2.0
    assert M.stoi(x, noisy, sr) < 0.95
    assert M.mcd(x, noisy, sr) > 2.0
    # SNR of a known delta: a sine of amplitude A (power A^2/2) plus a constant c (power c^2)
    t = np.arange(sr, dtype=np.float64) / sr
    sine = 0.5 * np.sin(2 * np.pi * 440 * t)
    assert M.snr_db(sine, sine + 0.005) == pytest.approx(10 * math.log10(0.125 / 0.005**2), abs=1e-3)
    # the cloak-sized perturbation: l-inf 0.002 white noise on speech
    delta = rng.uniform(-0.002, 0.002, x.size).astype(np.float32)
    imp = M.imperceptibility(x, x + delta, sr)
    assert set(imp) == {"pesq", "stoi", "snr_db", "mcd_db", "linf"}
    assert imp["linf"] == pytest.approx(0.002, abs=1e-4)
    assert imp["snr_db"] == pytest.approx(10 * math.log10(np.sum(x.astype(np.float64) ** 2)
                                                          / np.sum(delta.astype(np.float64) ** 2)), abs=1e-3)
    assert 1.0 < imp["pesq"] < M.PESQ_MAX and 0.9 < imp["stoi"] <= 1.0 and imp["mcd_db"] > 0


def test_dnsmos_noise_is_low_and_real_speech_high(speech, dnsmos):
    x, sr = speech
    rng = np.random.default_rng(1)
    noise = dnsmos(rng.normal(0, 0.1, 3 * 16000).astype(np.float32), 16000)
    clean = dnsmos(x, sr)
    assert set(clean) == {"sig", "bak", "ovrl", "p808"}
    assert noise["ovrl"] < 2.5 and noise["sig"] < 2.5
    assert clean["ovrl"] > 2.8 and clean["ovrl"] > noise["ovrl"] + 1.0
    assert clean["p808"] > noise["p808"]
    assert dnsmos(to_rate(x, sr, 22050), 22050)["ovrl"] == pytest.approx(clean["ovrl"], abs=0.15)  # any rate in
    assert set(dnsmos.info) == {"p835", "p808"} and all(len(v["sha256"]) == 64 for v in dnsmos.info.values())


def test_bootstrap_and_eer():
    rng = np.random.default_rng(0)
    v = rng.normal(2.0, 1.0, 400)
    lo, hi = M.bootstrap_ci(v, seed=3)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert M.bootstrap_ci(v, seed=3) == (lo, hi)
    assert M.bootstrap_ci([1.0, None, float("nan")]) == (1.0, 1.0)
    assert M.summarize([]) == {"mean": None, "ci95": [None, None], "n": 0}
    # separated scores: EER 0, threshold between the classes
    e = M.compute_eer([0.9, 0.8, 0.85], [0.1, 0.3, 0.2])
    assert e.eer == 0.0 and 0.3 < e.threshold < 0.8 and e.far_at_threshold == 0 and e.frr_at_threshold == 0
    # unit-variance Gaussians 2 apart: EER = Phi(-1) = 0.1587
    e = M.compute_eer(rng.normal(1, 1, 20000), rng.normal(-1, 1, 20000))
    assert e.eer == pytest.approx(0.1587, abs=0.01) and abs(e.threshold) < 0.05


def test_ge2e_eer_calibration_separates_speakers_on_corpus(corpus):
    from cloak.corpus import list_speakers
    from cloak.evaluate.calibration import calibrate
    from cloak.models import GE2E

    enc = M.GE2EEncoder(GE2E.load())
    speakers = [s for s in list_speakers(corpus) if len(s.files) >= 4]
    chosen = [s for s in speakers if s.sex == "M"][:3] + [s for s in speakers if s.sex == "F"][:3]
    emb = {}
    for s in chosen:
        emb[s.name] = {}
        for f in s.files[:4]:
            x, sr = corpus_clip(s.name, s.files.index(f), seconds=4.0)
            emb[s.name][f.name] = {"ge2e": enc.embed(to_rate(x, sr, 16000))}
    cal = calibrate(["ge2e"], emb)["ge2e"]
    assert cal["n_target"] == 24 and cal["n_nontarget"] == 24 * 5
    assert cal["eer"] < 0.1  # well below chance (0.5); on this corpus it is 0
    assert cal["nontarget_scores"]["mean"] < cal["threshold"] < cal["target_scores"]["mean"]
    assert cal["target_scores"]["mean"] - cal["nontarget_scores"]["mean"] > 0.15


# -------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_keeps_length_and_rate_and_changes_audio(speech, name):
    x16, sr16 = speech
    x = to_rate(x16, sr16, 22050)[: 2 * 22050]
    y = TRANSFORMS[name](x, 22050, seed=0)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max() <= 1
    assert np.max(np.abs(y - x)) > 1e-3
    snr = M.snr_db(x, y)
    if name.startswith("mp3") or name == "resample_16k":
        assert snr > 12  # sample-aligned: a 1-sample misalignment would give ~3-7 dB on speech
    if name == "noise_30db":
        assert snr == pytest.approx(30.0, abs=0.3)
        assert np.array_equal(y, TRANSFORMS[name](x, 22050, seed=0))
    if name == "lowpass_4k":
        f = np.fft.rfftfreq(x.size, 1 / 22050)
        band = f > 5000
        e_in = np.sum(np.abs(np.fft.rfft(x))[band] ** 2)
        e_out = np.sum(np.abs(np.fft.rfft(y))[band] ** 2)
        assert 10 * np.log10(e_in / e_out) > 30
    if name == "denoise":
        assert np.sum(y.astype(np.float64) ** 2) < np.sum(x.astype(np.float64) ** 2)


def test_mp3_bitrates_order_and_resample_identity_at_16k(speech):
    x, sr = speech
    snrs = [M.snr_db(x, TRANSFORMS[f"mp3_{b}"](x, sr)) for b in (128, 64, 32)]
    assert snrs[0] >= snrs[2] > 10
    assert np.array_equal(TRANSFORMS["resample_16k"](x, sr), x)  # reported as an identity at this rate


# ------------------------------------------------------------------------------------------ protocol


def test_speaker_selection_and_gender_matched_sources():
    from pathlib import Path

    from cloak.corpus import Speaker
    from cloak.evaluate.plan import pick_sources, select_speakers

    spk = [Speaker("a", "M", [Path("a/1.wav"), Path("a/2.wav")]), Speaker("b", "M", [Path("b/1.wav"), Path("b/2.wav")]),
           Speaker("c", "F", [Path("c/1.wav"), Path("c/2.wav"), Path("c/3.wav")]), Speaker("d", "F", [Path("d/1.wav")]),
           Speaker("e", "F", [Path("e/1.wav"), Path("e/2.wav")])]
    assert [s.name for s in select_speakers(spk, None)] == ["a", "b", "c", "e"]  # d has one file only
    two = select_speakers(spk, 2)
    assert len(two) == 2 and two[0].sex == two[1].sex  # a same-sex pair, so sources can be gender-matched
    src, matched = pick_sources(spk[0], Path("a/1.wav"), spk, 3, seed=0)
    assert matched and len(src) == 3 and all(p.parent.name == "b" for p in src)
    assert pick_sources(spk[0], Path("a/1.wav"), spk, 3, seed=0) == (src, matched)  # deterministic
    src, matched = pick_sources(spk[2], Path("c/1.wav"), spk, 2, seed=0)
    assert matched and {p.parent.name for p in src} == {"d", "e"}  # distinct speakers first
    alone = [Speaker("x", "M", [Path("x/1.wav"), Path("x/2.wav")]), spk[2]]
    src, matched = pick_sources(alone[0], Path("x/1.wav"), alone, 1, seed=0)
    assert not matched and src[0].parent.name == "c"  # fallback, flagged in the report


@pytest.fixture()
def evaluate_main(monkeypatch):
    """clients.cli.main, where `evaluate` is wired in."""
    from clients import cli
    from clients.evaluate_cmd import evaluate_available

    assert evaluate_available()
    assert "evaluate" in [sc.name for sc in cli.SUBCOMMANDS]
    return cli.main


@pytest.fixture()
def two_speakers(tmp_path, corpus):
    d = tmp_path / "speakers"
    d.mkdir()
    for name in ("vctk_p226", "vctk_p227"):
        shutil.copytree(CORPUS / name, d / name)
    (d / "speakers.tsv").write_text("vctk_p226\tM\nvctk_p227\tM\n")
    return d


def test_cli_usage_errors(evaluate_main, tmp_path, two_speakers, capsys):
    assert evaluate_main(["evaluate", "--help"]) == 0
    assert "report.json" in capsys.readouterr().out
    assert evaluate_main(["evaluate", "--speakers", str(tmp_path / "nope")]) == 2
    assert evaluate_main(["evaluate", "--speakers", str(two_speakers), "--transforms", "mp3_7"]) == 2
    assert evaluate_main(["evaluate", "--speakers", str(two_speakers), "--losses", "id,xx"]) == 2
    assert evaluate_main(["evaluate", "--speakers", str(two_speakers), "--utterances", "0"]) == 2
    assert evaluate_main(["evaluate", "--speakers", str(two_speakers), "--models", str(tmp_path / "none")]) == 4
    one = tmp_path / "one"
    shutil.copytree(two_speakers / "vctk_p226", one / "vctk_p226")
    bundle = make_bundle(tmp_path / "bundle", tame=True)
    rc = evaluate_main(["evaluate", "--speakers", str(one), "--models", str(bundle), "--quick", "-q",
                        "--out", str(tmp_path / "o")])
    assert rc == 2 and "two speakers" in capsys.readouterr().err


def test_quick_run_report_schema_plots_and_resume(evaluate_main, tmp_path, two_speakers, capsys, monkeypatch):
    import clients.evaluate_cmd
    from clients.cli import make_protector

    made, protected = [], []

    def spy(settings, remote, say=None):  # the run protects through make_protector's local protector
        made.append(remote)
        protector = make_protector(settings, remote, say)
        real = protector.protect
        protector.protect = lambda *a, **k: protected.append(a[1]) or real(*a, **k)
        return protector

    monkeypatch.setattr(clients.evaluate_cmd, "make_protector", spy)
    bundle = make_bundle(tmp_path / "bundle", tame=True)
    out = tmp_path / "report"
    argv = ["evaluate", "--speakers", str(two_speakers), "--models", str(bundle), "--out", str(out), "--quick",
            "--transforms", "mp3_32,resample_16k", "--max-seconds", "1.5", "--threads", "1", "-q", "--json"]
    assert evaluate_main(argv) == 0
    assert made == [None] and len(protected) == 2  # one protector, one protection per planned utterance
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"] == str(out / "report.json")
    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "voicecloak-evaluate/1"
    for key in ("versions", "settings", "models", "protocol", "encoders", "nisqa", "speakers", "headline",
                "imperceptibility", "reference_quality", "conditions", "protected", "items", "cache", "plots"):
        assert key in r, key
    assert r["versions"]["torch"] and r["versions"]["onnxruntime"] and r["versions"]["pesq"]
    assert {m["name"] for m in r["models"]["bundle"]} >= {"diffvc", "ge2e"}
    assert all(len(m["sha256"]) == 64 for m in r["models"]["bundle"])
    assert set(r["models"]["dnsmos"]) == {"p835", "p808"}
    assert r["settings"]["quick"] and r["settings"]["config"]["iterations"] == 2 and r["settings"]["steps"] == 3
    # encoders: GE2E calibrated and white-box; WavLM / ECAPA / NISQA reported as not configured
    ge2e = r["encoders"]["ge2e"]
    assert ge2e["available"] and ge2e["white_box"] and ge2e["threshold"] == ge2e["calibration"]["threshold"]
    assert 0 <= ge2e["calibration"]["eer"] < 0.5
    assert not r["encoders"]["wavlm"]["available"] and not r["encoders"]["ecapa"]["available"]
    assert "not configured" in r["encoders"]["ecapa"]["reason"] and not r["nisqa"]["available"]
    # the shipped black-box verifier: scored beside GE2E, at the threshold shipped with its weights, and the ASV
    # that decides while no ECAPA is configured
    from cloak.models.verifier import load_verifier

    shipped = load_verifier()
    ver = r["encoders"]["verifier"]
    assert ver["available"] and not ver["white_box"] and ver["checksum"] == shipped.checksum
    assert ver["threshold"] == ver["fixed_threshold"] == shipped.threshold
    assert "held out" in ver["threshold_source"] and 0 <= ver["calibration"]["eer"] <= 1
    assert r["protocol"]["asv_primary"] == "verifier" and not r["protocol"]["asv_primary_white_box"]
    assert r["headline"]["asv"] == "verifier" and r["headline"]["threshold"] == shipped.threshold
    assert r["protocol"]["gender_matched_fraction"] == 1.0
    assert r["protocol"]["quality_threshold"] == 2.5 and "DNSMOS" in r["protocol"]["quality_threshold_why"]
    # 2 speakers x 1 utterance x 1 source x (clean, protected, 2 transforms x (protected, clean))
    assert [s["name"] for s in r["speakers"]] == ["vctk_p226", "vctk_p227"] and len(r["protected"]) == 2
    assert list(r["conditions"]) == ["clean", "protected", "protected+mp3_32", "clean+mp3_32",
                                     "protected+resample_16k", "clean+resample_16k"]
    assert len(r["items"]) == 12
    assert r["conditions"]["protected+resample_16k"]["identity_transform"]  # 16 kHz input
    assert not r["conditions"]["protected+mp3_32"]["identity_transform"]
    for it in r["items"]:
        assert -1 <= it["scores"]["ge2e"] <= 1 and 0 < it["dnsmos"]["ovrl"] < 5  # polynomial-mapped MOS
        assert -1 <= it["scores"]["verifier"] <= 1 and it["scores"]["verifier"] != it["scores"]["ge2e"]
        assert it["source_speaker"] != it["speaker"]
        # every clone is also scored against its source speaker (attacker check; closer-to-target per condition)
        assert -1 <= it["source_scores"]["ge2e"] <= 1 and it["source_scores"]["ge2e"] != it["scores"]["ge2e"]
    ac = r["attacker_check"]
    assert ac["available"] and ac["n"] == 2 and ac["closer_to_target_rate"]["mean"] in (0.0, 0.5, 1.0)
    assert ac["clones"] == (ac["closer_to_target_rate"]["mean"] > 0.5)
    ct = r["closer_to_target"]
    assert set(ct) == set(r["conditions"])
    assert ct["clean"]["verifier"] == ac  # the attacker check is the clean row with the primary encoder
    for per in ct.values():
        assert set(per) == {"ge2e", "verifier"} and per["verifier"]["n"] == 2
    # the reference recordings themselves, per condition: real speech of the speaker is accepted clean
    ri = r["reference_identity"]
    assert set(ri) == set(r["conditions"])
    assert ri["clean"]["ge2e"]["score"]["mean"] > 0.7 and "delta_vs_clean" not in ri["clean"]["ge2e"]
    assert ri["protected+resample_16k"]["ge2e"]["score"] == ri["protected"]["ge2e"]["score"]  # identity at 16 kHz
    assert ri["protected"]["ge2e"]["delta_vs_clean"]["n"] == 2
    for name, c in r["conditions"].items():
        assert c["n"] == 2
        assert set(c["dnsmos"]) == {"sig", "bak", "ovrl", "p808"}
        assert 0 <= c["dsr"]["mean"] <= 1 and len(c["dsr"]["ci95"]) == 2
        assert c["asv"]["ge2e"]["accept_rate"]["mean"] in (0.0, 0.5, 1.0)
        assert c["asv"]["verifier"]["threshold"] == shipped.threshold
        assert c["asv"]["verifier"]["accept_rate"]["mean"] in (0.0, 0.5, 1.0)
        assert set(c["dsr_sensitivity"]) == {"2.5", "2.75", "3"}
        if name != "clean":
            assert "score_ge2e" in c["delta_vs_clean"] and "dnsmos_ovrl" in c["delta_vs_clean"]
    assert "delta_vs_baseline" in r["conditions"]["protected+mp3_32"]
    imp = r["imperceptibility"]
    assert imp["pesq"]["n"] == 2 and 3.5 < imp["pesq"]["mean"] <= 4.65  # 2 PGD steps: nearly transparent
    assert imp["linf"]["mean"] <= 0.002 + 1e-6 and imp["snr_db"]["mean"] > 30 and imp["stoi"]["mean"] > 0.95
    assert r["reference_quality"]["clean"]["ovrl"]["mean"] > 2.5  # real speech
    assert r["cache"]["protected"] == {"computed": 2, "reused": 0}
    assert r["cache"]["clones"] == {"computed": 8, "reused": 0}  # the 4 resample_16k clones are identities
    assert sorted(r["plots"]) == ["delta_spectrogram.png", "dnsmos.png", "dsr.png", "scores.png"]
    for p in r["plots"]:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for heading in ("| setting | ASV accept | DNSMOS OVRL | DSR | PESQ | MCD (dB) | SNR (dB) | STOI |",
                    "## Robustness", "## ASV calibration", "## Imperceptibility", "white-box", "mp3_32",
                    "## Attacker check", "## Identity of the reference recording itself",
                    "## Clones closer to the reference speaker than to their source",
                    "ASV = verifier cosine", "| verifier | black-box |", "| ge2e | white-box |",
                    "Threshold of verifier: shipped with the weights"):
        assert heading in md
    # resume: a second run recomputes nothing (protect and clone would fail) and reports the same numbers
    import cloak
    import cloak.clone

    def boom(*a, **k):
        raise AssertionError("cache not used")

    monkeypatch.setattr(cloak, "protect", boom)
    monkeypatch.setattr(cloak.clone, "clone", boom)
    assert evaluate_main(argv) == 0
    r2 = json.loads((out / "report.json").read_text())
    assert r2["cache"]["protected"] == {"computed": 0, "reused": 2}
    assert r2["cache"]["clones"] == {"computed": 0, "reused": 8}
    assert r2["cache"]["embeddings"]["computed"] == 0
    assert r2["conditions"] == r["conditions"] and r2["imperceptibility"] == r["imperceptibility"]


def test_losses_ablation_protects_anew_and_reuses_the_clean_clones(evaluate_main, tmp_path, two_speakers):
    """Paper Table 3: `--losses` changes the cloak (new protected audio, other loss terms in the report) while the
    clones of clean references, which do not depend on the cloak, come from the shared cache."""
    bundle = make_bundle(tmp_path / "bundle", tame=True)
    cache = tmp_path / "cache"
    common = ["evaluate", "--speakers", str(two_speakers), "--models", str(bundle), "--quick", "--transforms", "none",
              "--max-seconds", "1.5", "--threads", "1", "-q", "--no-plots", "--cache", str(cache)]
    assert evaluate_main([*common, "--out", str(tmp_path / "all")]) == 0
    assert evaluate_main([*common, "--out", str(tmp_path / "id"), "--losses", "id"]) == 0
    full, abl = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("all", "id"))
    assert full["protocol"]["loss_terms"] == ["id", "ctx", "score", "sem"] and abl["protocol"]["loss_terms"] == ["id"]
    assert abl["cache"]["protected"] == {"computed": 2, "reused": 0}
    assert abl["cache"]["clones"] == {"computed": 2, "reused": 2}  # the clean clones are shared
    assert abl["cache"]["protect_fingerprint"] != full["cache"]["protect_fingerprint"]
    assert abl["conditions"]["clean"] == full["conditions"]["clean"]
    prot_full = [p["losses_end"] for p in full["protected"]]
    prot_abl = [p["losses_end"] for p in abl["protected"]]
    assert prot_full != prot_abl  # another objective, another perturbation


def test_transfer_attacker_clones_the_audio_protected_on_another_model(evaluate_main, tmp_path, two_speakers):
    """--attacker-models: the cloak is computed on --models, the clones come from another DiffVC; the protected
    audio is the white-box run's (cached by the cloak's models and settings), the clones are new."""
    cloak_bundle = make_bundle(tmp_path / "bundle", tame=True)
    other = make_bundle(tmp_path / "other", tame=True, seed=1)
    cache = tmp_path / "cache"
    common = ["evaluate", "--speakers", str(two_speakers), "--models", str(cloak_bundle), "--quick", "--transforms",
              "none", "--max-seconds", "1.5", "--threads", "1", "-q", "--no-plots", "--cache", str(cache)]
    assert evaluate_main([*common, "--out", str(tmp_path / "white")]) == 0
    assert evaluate_main([*common, "--out", str(tmp_path / "transfer"), "--attacker-models", str(other)]) == 0
    white, transfer = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("white", "transfer"))
    assert not white["models"]["transfer"] and transfer["models"]["transfer"]
    assert transfer["models"]["cloak"] == white["models"]["attacker"] != transfer["models"]["attacker"]
    assert "transfer" in transfer["protocol"]["attack"]
    assert transfer["cache"]["protected"] == {"computed": 0, "reused": 2}
    assert transfer["cache"]["clones"] == {"computed": 4, "reused": 0}
    assert transfer["cache"]["cloak_fingerprint"] == white["cache"]["cloak_fingerprint"]
    assert [p["losses_end"] for p in transfer["protected"]] == [p["losses_end"] for p in white["protected"]]
    assert evaluate_main([*common, "--out", str(tmp_path / "x"), "--attacker-models", str(tmp_path / "nope")]) == 2


def test_cancelled_run_raises_and_writes_no_report(tmp_path, two_speakers):
    from cloak import Cancelled, CancelToken, load_models
    from cloak.evaluate import EvalSettings, evaluate

    models = load_models(make_bundle(tmp_path / "bundle", tame=True))
    token = CancelToken()
    token.cancel()
    settings = EvalSettings(speakers_dir=two_speakers, out_dir=tmp_path / "out", max_speakers=2, utterances=1)
    with pytest.raises(Cancelled):
        evaluate(settings, models, cancel=token, progress=False, log=lambda m: None)
    assert not (tmp_path / "out" / "report.json").exists()


def test_attacker_check_flags_an_attacker_that_keeps_the_source_voice():
    from cloak.evaluate.report import attacker_check, attacker_note

    def item(to_target, to_source):
        return {"scores": {"ge2e": to_target}, "source_scores": {"ge2e": to_source}}

    keeps = attacker_check([item(0.6, 0.7), item(0.55, 0.72), item(0.7, 0.65)], "ge2e", 200, 0)
    assert keeps["n"] == 3 and abs(keeps["closer_to_target_rate"]["mean"] - 1 / 3) < 1e-9 and not keeps["clones"]
    assert keeps["clone_vs_source"]["mean"] > keeps["clone_vs_target"]["mean"]
    assert "source" in attacker_note(keeps)[0]
    clones = attacker_check([item(0.8, 0.5), item(0.75, 0.6)], "ge2e", 200, 0)
    assert clones["clones"] and attacker_note(clones) == []
    assert not attacker_check([{"scores": {"ge2e": 0.5}}], "ge2e", 200, 0)["available"]  # old cache records
