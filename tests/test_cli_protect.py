"""`cloak protect` (clients.cli) in-process on real speech with a tiny random DiffVC: formats, JSON, the bound, outputs,
settings and their precedence, bad inputs and settings, remote flags, Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_helpers import (  # noqa: F401 - fixtures are found by name (autouse ones, and arguments)
    EPS,
    FAST,
    SUMMARY_KEYS,
    bundle_fixture,
    clean_env,
    flac48,
    json_lines,
    mono16,
    one_torch_thread,
    read_2d,
    speech_fixture,
    stereo44,
)

import cloak
from clients import cli
from clients.cli import main

# ---------------------------------------------------------------------------------------------- protect


def test_protect_formats_json_and_bound(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    inputs = [mono16(speech, src / "mono16.wav"), stereo44(speech, src / "stereo44.wav"),
              flac48(speech, src / "voice48.flac")]
    ogg = src / "lossy.ogg"
    sf.write(str(ogg), speech.astype(np.float32), 16000, format="OGG", subtype="VORBIS")
    out_dir = tmp_path / "out" / "nested"  # does not exist yet: created
    rc = main(["protect", *map(str, inputs), str(ogg), "-o", str(out_dir), "--models", str(bundle), "--json", *FAST])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    records = json_lines(cap.out)
    assert len(records) == 4

    expected = {"mono16.wav": ("mono16.cloaked.wav", "WAV", "PCM_16"),  # the sample format is kept
                "stereo44.wav": ("stereo44.cloaked.wav", "WAV", "PCM_16"),
                "voice48.flac": ("voice48.cloaked.flac", "FLAC", "PCM_16"),
                "lossy.ogg": ("lossy.cloaked.wav", "WAV", "FLOAT")}
    dv_sha = hashlib.sha256((bundle / "diffvc.pt").read_bytes()).hexdigest()
    for rec in records:
        assert SUMMARY_KEYS <= rec.keys() and rec["ok"] is True
        assert len(rec["masking_exponents"]) == len(rec["predicted_pesq"]) == rec["windows"]
        assert all(0.0 <= g <= 1.0 for g in rec["masking_exponents"])  # chosen per window (the default)
        inp, out = Path(rec["input"]), Path(rec["output"])
        name, fmt, subtype = expected[inp.name]
        assert out == out_dir / name and out.is_file() and out != inp
        info_in, info_out = sf.info(str(inp)), sf.info(str(out))
        assert (info_out.format, info_out.subtype) == (fmt, subtype)
        assert info_out.samplerate == info_in.samplerate
        assert info_out.channels == info_in.channels
        assert info_out.frames == info_in.frames
        diff = np.max(np.abs(read_2d(out) - read_2d(inp)))
        assert 0 < diff <= EPS
        assert rec["linf"] == pytest.approx(diff, abs=1e-7) and rec["linf"] <= EPS
        assert np.isfinite(rec["snr_db"]) and rec["snr_db"] > 20
        assert rec["iterations"] == 2 and rec["windows"] == 1 and rec["gender"] == "M"
        assert set(rec["losses_start"]) == set(rec["losses_end"]) == {"id", "ctx", "score", "sem"}
        assert rec["config"]["epsilon"] == EPS and rec["config"]["iterations"] == 2
        assert {"name": "diffvc", "sha256": dv_sha} in rec["models"]
        assert all(set(m) == {"name", "sha256"} for m in rec["models"])
        assert isinstance(rec["seconds"], float)
    # stderr: plain progress lines (not a TTY) and the lossy-input warning; nothing of that on stdout
    assert "iteration 2/2" in cap.err
    assert "lossy" in cap.err and "lossy.ogg" in cap.err
    assert sorted(p.name for p in src.iterdir()) == ["lossy.ogg", "mono16.wav", "stereo44.wav", "voice48.flac"]
    assert not list(out_dir.glob(".*partial"))


def test_default_output_refuse_overwrite_and_force(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    inp = mono16(speech[:16000], tmp_path / "take.wav")
    original = inp.read_bytes()
    args = ["protect", str(inp), "--models", str(bundle), *FAST]
    assert main(args) == 0
    out = tmp_path / "take.cloaked.wav"
    assert out.is_file() and inp.read_bytes() == original
    assert str(out) in capsys.readouterr().out

    before = out.read_bytes()
    st = out.stat()
    assert main(args) == 2  # exists: refused before any work
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == before and out.stat().st_mtime_ns == st.st_mtime_ns

    assert main(["protect", str(inp), "-o", str(inp), "--force", "--models", str(bundle), *FAST]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert inp.read_bytes() == original

    assert main([*args, "--force", "--quiet"]) == 0
    assert out.stat().st_ino != st.st_ino  # atomically replaced
    assert inp.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take.cloaked.wav", "take.wav"]  # no .partial left


def test_bad_inputs_exit_3_others_processed(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    nan = tmp_path / "nan.wav"
    x = speech[:8000].astype(np.float32)
    x[100] = np.nan
    sf.write(str(nan), x, 16000, subtype="FLOAT")
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    good = mono16(speech[:16000], tmp_path / "good.wav")
    bad = [empty, text, nan, zero]
    rc = main(["protect", *map(str, bad), str(good), str(tmp_path / "missing.wav"), "--models", str(bundle),
               "--json", *FAST])
    cap = capsys.readouterr()
    assert rc == 3
    assert (tmp_path / "good.cloaked.wav").is_file()
    for b in bad:
        assert not b.with_name(b.stem + ".cloaked.wav").exists()
        assert b.name in cap.err
    assert "empty" in cap.err and "NaN" in cap.err and "not readable as audio" in cap.err
    assert "missing.wav: no such file" in cap.err
    records = {Path(r["input"]).name: r for r in json_lines(cap.out)}
    assert set(records) == {"empty.wav", "notes.wav", "nan.wav", "zero.wav", "good.wav", "missing.wav"}
    assert records["good.wav"]["ok"] is True
    assert all(r["ok"] is False and r["exit_code"] == 3 for n, r in records.items() if n != "good.wav")


@pytest.mark.parametrize("extra, needle", [
    (["--epsilon", "-1"], "epsilon"),
    (["--step-size", "0.01"], "--step-size must be in (0, epsilon]"),
    (["--losses", "id,bogus"], "losses"),
    (["--gender", "robot"], "invalid choice"),
    (["--weights", "1", "2", "3"], "--weights"),
    (["--iterations", "many"], "invalid int"),
    (["--threads", "0"], "--threads"),
])
def test_bad_settings_exit_2(tmp_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture[str],
                             extra: list[str], needle: str) -> None:
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--models", str(tmp_path / "no-such-bundle"), *extra]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "a.cloaked.wav").exists()


def test_missing_bundle_exit_4(tmp_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--models", str(tmp_path / "no-such-bundle"), *FAST]) == 4
    err = capsys.readouterr().err
    assert "model bundle" in err and "no-such-bundle" in err
    assert not (tmp_path / "a.cloaked.wav").exists()


def test_several_inputs_need_output_dir(tmp_path: Path, speech: np.ndarray,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = mono16(speech[:16000], tmp_path / "a.wav"), mono16(speech[:16000], tmp_path / "b.wav")
    assert main(["protect", str(a), str(b), "-o", str(tmp_path / "out.wav")]) == 2
    assert "output directory" in capsys.readouterr().err
    assert main(["protect", str(a), "-o", str(tmp_path / "out.txt")]) == 2
    assert not (tmp_path / "out.wav").exists()


def test_remote_flags_need_a_reachable_server(tmp_path: Path, speech: np.ndarray,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--server", "127.0.0.1:1", "--iterations", "1"]) == 5
    assert "server unavailable" in capsys.readouterr().err
    assert not (tmp_path / "a.cloaked.wav").exists()
    for flag in (["--token-file", "t"], ["--tls-ca", "ca.pem"]):
        assert main(["protect", str(inp), *flag]) == 2
        assert "--server" in capsys.readouterr().err


def test_paper_preset_is_a_layer_under_file_and_flags(tmp_path: Path, speech: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))

    def effective(*extra: str) -> dict:
        assert main(["protect", str(inp), "--dry-run", "--json", "--device", "cpu", *extra]) == 0
        (rec,) = json_lines(capsys.readouterr().out)
        return rec["config"]

    default = effective()
    assert default["shaping"] == "masking" and default["losses"] == ["id", "ctx", "score", "sem", "voice"]
    paper = effective("--preset", "paper")
    assert paper["shaping"] == "none" and paper["losses"] == ["id", "ctx", "score", "sem"]
    assert paper["weights"][:4] == [1.0, 4.5, 10.0, 0.85]
    assert effective("--preset", "paper", "--shaping", "masking")["shaping"] == "masking"  # a flag beats the preset
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "paper"\niterations = 3\n')
    from_file = effective("--config", str(cfg))
    assert from_file["shaping"] == "none" and from_file["iterations"] == 3
    assert main(["protect", str(inp), "--dry-run", "--preset", "fastest"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_settings_precedence(tmp_path: Path, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    xdg = tmp_path / "xdg" / "voicecloak"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text('iterations = 7\nseed = 5\nmodels = "/from/toml"\nid-encoders = "ge2e"\n'
                                     "weights = [1, 2, 3, 4]\n")

    def effective(*extra: str) -> dict:
        assert main(["protect", str(inp), "--dry-run", "--json", "--device", "cpu", *extra]) == 0
        (rec,) = json_lines(capsys.readouterr().out)
        assert rec["output"] == str(tmp_path / "a.cloaked.wav")
        return rec

    rec = effective()  # default config file
    assert (rec["config"]["iterations"], rec["config"]["seed"], rec["models_dir"]) == (7, 5, "/from/toml")
    assert rec["config"]["weights"] == [1.0, 2.0, 3.0, 4.0, 10.0]  # four numbers: lambda_voice keeps its default
    assert rec["config"]["id_encoders"] == ["ge2e"]
    monkeypatch.setenv("CLOAK_MODELS", "/from/env")
    rec = effective("--seed", "9")  # env beats the file, flags beat both
    assert (rec["config"]["iterations"], rec["config"]["seed"], rec["models_dir"]) == (7, 9, "/from/env")
    assert effective("--models", "/from/flag")["models_dir"] == "/from/flag"

    explicit = tmp_path / "settings.json"
    explicit.write_text(json.dumps({"epsilon": 0.003, "losses": ["id", "sem"]}))
    rec = effective("--config", str(explicit), "--iterations", "3")  # --config replaces the default file
    assert rec["config"]["epsilon"] == 0.003 and rec["config"]["losses"] == ["id", "sem"]
    assert rec["config"]["iterations"] == 3 and rec["config"]["seed"] == 0

    explicit.write_text(json.dumps({"epsilon": 0.003, "colour": "blue"}))
    assert main(["protect", str(inp), "--dry-run", "--config", str(explicit)]) == 2
    assert "unknown setting 'colour'" in capsys.readouterr().err
    explicit.write_text(json.dumps({"iterations": "lots"}))
    assert main(["protect", str(inp), "--dry-run", "--config", str(explicit)]) == 2
    assert "iterations" in capsys.readouterr().err
    assert main(["protect", str(inp), "--dry-run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_directories_globs_and_lossy_output(tmp_path: Path, speech: np.ndarray,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "rec"
    (root / "day2").mkdir(parents=True)
    mono16(speech[:16000], root / "a.wav")
    mono16(speech[:16000], root / "old.cloaked.wav")  # an earlier output: skipped when expanding
    (root / "notes.txt").write_text("x")
    flac48(speech[:16000], root / "day2" / "b.flac")

    def planned(*args: str) -> list[tuple[str, str]]:
        assert main(["protect", *args, "--dry-run", "--json", "--device", "cpu"]) == 0
        return sorted((Path(r["input"]).name, r["output"]) for r in json_lines(capsys.readouterr().out))

    assert planned(str(root)) == [("a.wav", str(root / "a.cloaked.wav"))]
    out = tmp_path / "out"
    assert planned(str(root), "-r", "-o", str(out)) == [("a.wav", str(out / "a.cloaked.wav")),
                                                         ("b.flac", str(out / "day2" / "b.cloaked.flac"))]
    assert not out.exists()  # a dry run creates nothing
    assert planned(str(root / "*.wav")) == [("a.wav", str(root / "a.cloaked.wav"))]
    assert planned(str(root / "a.wav"), "-o", str(tmp_path / "x.ogg")) == [("a.wav", str(tmp_path / "x.ogg"))]
    assert main(["protect", str(root / "a.wav"), "-o", str(tmp_path / "x.mp3"), "--dry-run", "--device", "cpu"]) == 0
    assert "lossy MP3 encoding weakens the protection" in capsys.readouterr().err


def test_ctrl_c_cancels_without_partial_output(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b = mono16(speech[:16000], tmp_path / "a.wav"), mono16(speech[:16000], tmp_path / "b.wav")
    real = cloak.protect

    def interrupted(*args, progress=None, cancel=None, **kw):  # noqa: ANN002, ANN003
        def hook(p: cloak.Progress) -> None:
            if progress is not None:
                progress(p)
            if p.iteration == 1:
                signal.raise_signal(signal.SIGINT)  # what Ctrl-C does

        return real(*args, progress=hook, cancel=cancel, **kw)

    monkeypatch.setattr(cloak, "protect", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    rc = main(["protect", str(a), str(b), "--models", str(bundle), *FAST[:1], "4", *FAST[2:]])
    assert rc == 130
    assert "cancel" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.wav", "b.wav"]
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored


def test_every_protect_config_field_has_a_flag() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    protect = sub.choices["protect"]  # type: ignore[union-attr]
    dests = {a.dest for a in protect._actions}
    assert {f.name for f in fields(cloak.ProtectConfig)} <= dests


