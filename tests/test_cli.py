"""Tests of the `cloak` command line (clients.cli), in-process on real speech (the sample shipped with the package)
with a tiny random DiffVC."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLE
from scipy.signal import resample_poly

import cloak
from clients import cli
from clients.cli import main
from clients.cli import protector as cli_protector

SPEECH = SAMPLE  # LibriSpeech 3331-159605-0003, 16 kHz PCM_16 FLAC, ships with the package
EPS = 0.002
# tiny, fast settings: 2 iterations, a single draw per step; a large step so the perturbation is clearly > 0
FAST = ["--iterations", "2", "--repeats", "1", "--t-adv", "1", "--source-frames", "32", "--gender", "male",
        "--epsilon", str(EPS), "--step-size", "0.001"]
SUMMARY_KEYS = {"input", "output", "seconds", "snr_db", "linf", "losses_start", "losses_end", "iterations",
                "windows", "gender", "models", "config"}


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CLOAK_MODELS", "CLOAK_SERVER", "CLOAK_TOKEN_FILE", "CLOAK_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user config file leaks in


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: far faster than oversubscribed threads on a small busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloak.models import DiffVC

    torch.manual_seed(0)
    m = DiffVC(channels=32, filters=64, heads=2, layers=2, enc_dim=16, spk_dim=16, dec_dim=16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".g"):
                p.fill_(0.5)
    d = tmp_path_factory.mktemp("bundle")
    torch.save({"config": m.config.to_dict(), "state_dict": m.state_dict(), "meta": {}}, d / "diffvc.pt")
    return d


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, rate = sf.read(str(SPEECH), dtype="float64", start=8000, frames=32000)  # 2 s at 16 kHz
    assert rate == 16000
    return x * (0.8 / np.max(np.abs(x)))


def _mono16(speech: np.ndarray, path: Path) -> Path:
    sf.write(str(path), speech.astype(np.float32), 16000, subtype="PCM_16")
    return path


def _stereo44(speech: np.ndarray, path: Path) -> Path:
    x = resample_poly(speech, 441, 160)
    sf.write(str(path), np.stack([x, -0.5 * x[::-1]], axis=1).astype(np.float32), 44100, subtype="PCM_16")
    return path


def _flac48(speech: np.ndarray, path: Path) -> Path:
    sf.write(str(path), resample_poly(speech, 3, 1).astype(np.float32), 48000, format="FLAC", subtype="PCM_16")
    return path


def _read(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="float64", always_2d=True)[0]


def _json_lines(out: str) -> list[dict]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # every stdout line must be JSON


# ---------------------------------------------------------------------------------------------- protect


def test_protect_formats_json_and_bound(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    inputs = [_mono16(speech, src / "mono16.wav"), _stereo44(speech, src / "stereo44.wav"),
              _flac48(speech, src / "voice48.flac")]
    ogg = src / "lossy.ogg"
    sf.write(str(ogg), speech.astype(np.float32), 16000, format="OGG", subtype="VORBIS")
    out_dir = tmp_path / "out" / "nested"  # does not exist yet: created
    rc = main(["protect", *map(str, inputs), str(ogg), "-o", str(out_dir), "--models", str(bundle), "--json", *FAST])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    records = _json_lines(cap.out)
    assert len(records) == 4

    expected = {"mono16.wav": ("mono16.cloaked.wav", "WAV", "PCM_16"),  # the sample format is kept
                "stereo44.wav": ("stereo44.cloaked.wav", "WAV", "PCM_16"),
                "voice48.flac": ("voice48.cloaked.flac", "FLAC", "PCM_16"),
                "lossy.ogg": ("lossy.cloaked.wav", "WAV", "FLOAT")}
    dv_sha = hashlib.sha256((bundle / "diffvc.pt").read_bytes()).hexdigest()
    for rec in records:
        assert SUMMARY_KEYS <= rec.keys() and rec["ok"] is True
        inp, out = Path(rec["input"]), Path(rec["output"])
        name, fmt, subtype = expected[inp.name]
        assert out == out_dir / name and out.is_file() and out != inp
        info_in, info_out = sf.info(str(inp)), sf.info(str(out))
        assert (info_out.format, info_out.subtype) == (fmt, subtype)
        assert info_out.samplerate == info_in.samplerate
        assert info_out.channels == info_in.channels
        assert info_out.frames == info_in.frames
        diff = np.max(np.abs(_read(out) - _read(inp)))
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
    inp = _mono16(speech[:16000], tmp_path / "take.wav")
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
    good = _mono16(speech[:16000], tmp_path / "good.wav")
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
    records = {Path(r["input"]).name: r for r in _json_lines(cap.out)}
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
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--models", str(tmp_path / "no-such-bundle"), *extra]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "a.cloaked.wav").exists()


def test_missing_bundle_exit_4(tmp_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--models", str(tmp_path / "no-such-bundle"), *FAST]) == 4
    err = capsys.readouterr().err
    assert "model bundle" in err and "no-such-bundle" in err
    assert not (tmp_path / "a.cloaked.wav").exists()


def test_several_inputs_need_output_dir(tmp_path: Path, speech: np.ndarray,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _mono16(speech[:16000], tmp_path / "a.wav"), _mono16(speech[:16000], tmp_path / "b.wav")
    assert main(["protect", str(a), str(b), "-o", str(tmp_path / "out.wav")]) == 2
    assert "output directory" in capsys.readouterr().err
    assert main(["protect", str(a), "-o", str(tmp_path / "out.txt")]) == 2
    assert not (tmp_path / "out.wav").exists()


def test_remote_flags_need_a_reachable_server(tmp_path: Path, speech: np.ndarray,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), "--server", "127.0.0.1:1", "--iterations", "1"]) == 5
    assert "server unavailable" in capsys.readouterr().err
    assert not (tmp_path / "a.cloaked.wav").exists()
    for flag in (["--token-file", "t"], ["--tls-ca", "ca.pem"]):
        assert main(["protect", str(inp), *flag]) == 2
        assert "--server" in capsys.readouterr().err


def test_paper_preset_is_a_layer_under_file_and_flags(tmp_path: Path, speech: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))

    def effective(*extra: str) -> dict:
        assert main(["protect", str(inp), "--dry-run", "--json", "--device", "cpu", *extra]) == 0
        (rec,) = _json_lines(capsys.readouterr().out)
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
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    xdg = tmp_path / "xdg" / "voicecloak"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text('iterations = 7\nseed = 5\nmodels = "/from/toml"\nid-encoders = "ge2e"\n'
                                     "weights = [1, 2, 3, 4]\n")

    def effective(*extra: str) -> dict:
        assert main(["protect", str(inp), "--dry-run", "--json", "--device", "cpu", *extra]) == 0
        (rec,) = _json_lines(capsys.readouterr().out)
        assert rec["output"] == str(tmp_path / "a.cloaked.wav")
        return rec

    rec = effective()  # default config file
    assert (rec["config"]["iterations"], rec["config"]["seed"], rec["models_dir"]) == (7, 5, "/from/toml")
    assert rec["config"]["weights"] == [1.0, 2.0, 3.0, 4.0, 1.0]  # four numbers: lambda_voice keeps its default
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
    _mono16(speech[:16000], root / "a.wav")
    _mono16(speech[:16000], root / "old.cloaked.wav")  # an earlier output: skipped when expanding
    (root / "notes.txt").write_text("x")
    _flac48(speech[:16000], root / "day2" / "b.flac")

    def planned(*args: str) -> list[tuple[str, str]]:
        assert main(["protect", *args, "--dry-run", "--json", "--device", "cpu"]) == 0
        return sorted((Path(r["input"]).name, r["output"]) for r in _json_lines(capsys.readouterr().out))

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
    a, b = _mono16(speech[:16000], tmp_path / "a.wav"), _mono16(speech[:16000], tmp_path / "b.wav")
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


# ------------------------------------------------------------------------------------------- models, info


def test_models_list_and_verify(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models", str(bundle), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    dv = next(m for m in report["models"] if m["name"] == "diffvc")
    assert dv["path"] == str(bundle / "diffvc.pt")
    assert dv["sha256"] == hashlib.sha256((bundle / "diffvc.pt").read_bytes()).hexdigest()
    assert (dv["device"], dv["dtype"]) == ("cpu", "float32")
    assert any(m["name"] == "ge2e" and len(m["sha256"]) == 64 for m in report["models"])

    # a copy with SHA256SUMS: verify loads everything; a wrong digest or a missing file -> exit 4
    b2 = tmp_path / "bundle"
    b2.mkdir()
    (b2 / "diffvc.pt").write_bytes((bundle / "diffvc.pt").read_bytes())
    (b2 / "SHA256SUMS").write_text(f"{dv['sha256']}  diffvc.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "all models load" in out
    (b2 / "SHA256SUMS").write_text(f"{'0' * 64}  diffvc.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--device", "cpu"]) == 4
    assert "sha256 mismatch" in capsys.readouterr().err
    (b2 / "SHA256SUMS").write_text(f"{dv['sha256']}  diffvc.pt\n{'1' * 64}  ge2e.pt\n")
    assert main(["models", "verify", "--models", str(b2), "--json", "--device", "cpu"]) == 4
    cap = capsys.readouterr()
    assert "missing" in cap.err and json.loads(cap.out)["ok"] is False
    assert main(["models", "--models", str(tmp_path / "nowhere")]) == 4


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["voicecloak"] == cloak.__version__
    assert {"torch", "numpy", "soundfile", "python"} <= info["versions"].keys()
    assert isinstance(info["devices"]["cuda"], bool)
    assert info["config_file"] is None and info["default_config_file"].endswith("voicecloak/config.toml")
    assert main(["info"]) == 0
    assert "versions:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["protect"], ["models"], ["info"]])
def test_help_teaches_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit codes:" in out and "130" in out


def test_no_command_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["fly"]) == 2
    capsys.readouterr()


def test_clone_registered_only_if_available(capsys: pytest.CaptureFixture[str]) -> None:
    available = importlib.util.find_spec("cloak.clone") is not None
    assert main(["clone", "--help"]) == (0 if available else 2)
    capsys.readouterr()


def test_module_entry_point_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[2])}  # clients/cli/__init__.py
    r = subprocess.run([sys.executable, "-m", "clients.cli", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "protect" in r.stdout and "exit codes:" in r.stdout


# ------------------------------------------------------------------- formats kept, byte-identical outputs


def _fake_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No models: `cloak.protect` adds a fixed +-EPS pattern (the budget's very edge, where rounding to the nearest
    PCM step would break the bound). Returns the list that records every protect call."""
    from cloak import ProtectResult

    calls: list[str] = []

    def load(settings: cli.Settings) -> object:
        calls.append("load")
        return type("FakeModels", (), {"wavlm": None, "info": []})()

    def protect(audio, sample_rate, models, config, progress=None, cancel=None):  # noqa: ANN001, ANN202
        calls.append("protect")
        x = np.asarray(audio, dtype=np.float32)
        sign = np.where(np.arange(x.shape[0]) % 3 == 0, -1.0, 1.0).astype(np.float32)
        delta = config.epsilon * (sign if x.ndim == 1 else sign[:, None])
        out = np.clip(x + delta, -1, 1).astype(np.float32)
        return ProtectResult(out, sample_rate, {"seconds": 0.0, "iterations": 1})

    monkeypatch.setattr(cli_protector, "load_models_for", load)
    monkeypatch.setattr(cloak, "protect", protect)
    return calls


def _writable_subtypes() -> list[tuple[str, str]]:
    return [(fmt, sub) for fmt in ("WAV", "FLAC", "OGG") for sub in sorted(sf.available_subtypes(fmt))]


# what each input subtype comes back as: PCM depth and float kept; 8-bit (a step of 1/128 cannot hold a 0.002
# perturbation) becomes 16-bit; lossy/companded codecs become what their decoder gives, inside WAV
_EXPECTED_SUBTYPE = {"PCM_U8": "PCM_16", "PCM_S8": "PCM_16", "ULAW": "PCM_16", "ALAW": "PCM_16",
                     "IMA_ADPCM": "PCM_16", "MS_ADPCM": "PCM_16", "GSM610": "PCM_16", "G721_32": "PCM_16",
                     "NMS_ADPCM_16": "PCM_16", "NMS_ADPCM_24": "PCM_16", "NMS_ADPCM_32": "PCM_16",
                     "MPEG_LAYER_III": "FLOAT", "VORBIS": "FLOAT", "OPUS": "FLOAT"}


@pytest.mark.parametrize(("fmt", "subtype"), _writable_subtypes())
def test_every_subtype_comes_back_in_kind_within_the_bound(tmp_path: Path, speech: np.ndarray, fmt: str,
                                                           subtype: str, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    calls = _fake_engine(monkeypatch)
    ext = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg"}[fmt]
    inp = tmp_path / f"in{ext}"
    x = speech[:16000].astype(np.float32)
    try:
        sf.write(str(inp), np.stack([x, 0.5 * x], axis=1), 16000, format=fmt, subtype=subtype)
    except (sf.SoundFileError, RuntimeError, ValueError):
        inp.unlink(missing_ok=True)
        try:  # some codecs (GSM 6.10, G.721, NMS ADPCM) are mono only
            sf.write(str(inp), x, 16000, format=fmt, subtype=subtype)
        except (sf.SoundFileError, RuntimeError, ValueError) as e:
            pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}: {e}")
    info_in = sf.info(str(inp))
    want_fmt = "WAV" if fmt == "OGG" else fmt
    want_sub = _EXPECTED_SUBTYPE.get(subtype, subtype)
    outs = []
    for run in ("a", "b"):
        rc = main(["protect", str(inp), "-o", str(tmp_path / run) + "/", "--json", "--iterations", "1"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        rec = _json_lines(cap.out)[0]
        out = Path(rec["output"])
        assert out.suffix == (".flac" if fmt == "FLAC" else ".wav")
        outs.append(out)
    assert calls == ["load", "protect"] * 2
    info = sf.info(str(outs[0]))
    assert (info.format, info.subtype) == (want_fmt, want_sub)
    assert (rec["format"], rec["subtype"]) == (want_fmt, want_sub)
    assert (info.samplerate, info.channels, info.frames) == (info_in.samplerate, info_in.channels, info_in.frames)
    if want_sub != subtype:
        assert subtype in cap.err  # a warning says why the sample format changed
    ref, got = _read(inp), _read(outs[0])
    diff = np.abs(got - ref)
    assert diff.max() <= EPS and diff.max() >= 0.9 * EPS  # the bound holds on the written samples, delta survives
    assert rec["linf"] == diff.max()
    assert outs[0].read_bytes() == outs[1].read_bytes()  # same input, settings (and seed): same bytes


def test_pcm_and_float_files_end_to_end_same_subtype_same_bytes(tmp_path: Path, bundle: Path, speech: np.ndarray,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The real engine (tiny model): PCM_16/24/32 and float WAV and 24-bit FLAC keep their sample format, stay
    within epsilon as written, and two runs with the same seed write byte-identical files."""
    src = tmp_path / "in"
    src.mkdir()
    x = speech[:16000].astype(np.float32)
    inputs = {"p16.wav": "PCM_16", "p24.wav": "PCM_24", "p32.wav": "PCM_32", "f32.wav": "FLOAT", "p24.flac": "PCM_24"}
    for name, sub in inputs.items():
        sf.write(str(src / name), x, 16000, subtype=sub)
    digests = []
    for run in ("a", "b"):
        rc = main(["protect", str(src), "-o", str(tmp_path / run), "--models", str(bundle), "--json", *FAST,
                   "--seed", "3"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        recs = {Path(r["input"]).name: r for r in _json_lines(cap.out)}
        assert set(recs) == set(inputs)
        for name, sub in inputs.items():
            out = Path(recs[name]["output"])
            assert sf.info(str(out)).subtype == sub
            diff = np.abs(_read(out) - _read(src / name))
            assert 0 < diff.max() <= EPS
        digests.append({n: hashlib.sha256(Path(r["output"]).read_bytes()).hexdigest() for n, r in recs.items()})
    assert digests[0] == digests[1]
    raw = (tmp_path / "a" / "f32.cloaked.wav").read_bytes()
    assert b"PEAK" not in raw  # no timestamped chunk


# ------------------------------------------------------------------------------------ fail fast, pass through


@pytest.fixture()
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(settings: cli.Settings) -> None:
        raise AssertionError("models were loaded although nothing needed them")

    monkeypatch.setattr(cli_protector, "load_models_for", refuse)
    monkeypatch.setattr(cli_protector, "remote_protector", refuse)


@pytest.mark.parametrize(("extra", "line"), [
    (["--iterations", "-1"], "--iterations must be in [0, 10000], got -1"),
    (["--epsilon", "0.5"], "--epsilon must be in (0, 0.1], got 0.5"),
    (["--repeats", "0"], "--repeats must be in [1, 64], got 0"),
    (["--window-seconds", "0.5"], "--window-seconds must be in [1, 120], got 0.5"),
    (["--seed", "-3"], "--seed must be in [0, 2^63), got -3"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--iterations", "many"], "argument --iterations: invalid int value: 'many'"),
])
def test_flags_out_of_range_exit_2_with_one_line(tmp_path: Path, speech: np.ndarray, no_models: None,
                                                 capsys: pytest.CaptureFixture[str], extra: list[str],
                                                 line: str) -> None:
    inp = _mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert line in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_unusable_input_or_output_fails_before_models_load(tmp_path: Path, speech: np.ndarray, no_models: None,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    good = _mono16(speech[:16000], tmp_path / "good.wav")
    assert main(["protect", str(tmp_path / "missing.wav"), "--json"]) == 3
    cap = capsys.readouterr()
    assert "missing.wav: no such file" in cap.err and _json_lines(cap.out)[0]["exit_code"] == 3
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    assert main(["protect", str(text)]) == 3
    assert "not readable as audio" in capsys.readouterr().err
    nan = tmp_path / "nan.wav"
    y = speech[:8000].astype(np.float32)
    y[5] = np.nan
    sf.write(str(nan), y, 16000, subtype="FLOAT")
    assert main(["protect", str(nan)]) == 3  # found by reading the whole file, still before the models
    assert "NaN" in capsys.readouterr().err
    # outputs: a missing directory, a parent that is a file, an existing file without --force -> exit 2
    (tmp_path / "afile").write_text("x")
    for out, needle in [(tmp_path / "nodir" / "o.wav", "does not exist"),
                        (tmp_path / "afile" / "o.wav", "afile is a file"),
                        (good, "never overwritten"),
                        (text, "already exists (use --force")]:
        assert main(["protect", str(good), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "nothing was written" in err
    assert main(["protect", str(good), "-o", str(tmp_path / "afile" / "sub") + "/"]) == 2  # -o DIR under a file
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "good.wav", "nan.wav", "notes.wav"]


def test_iterations_0_short_and_silent_clips_come_back_unchanged(tmp_path: Path, speech: np.ndarray,
                                                                 no_models: None,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    clips = {"take.wav": (speech[:16000], "PCM_24"), "short.wav": (speech[:3200], "PCM_16"),  # 0.2 s
             "silent.flac": (np.zeros(32000), "PCM_16"),
             "hum.wav": (speech[:32000] * (10 ** (-65 / 20) / np.max(np.abs(speech))), "FLOAT")}  # peak -65 dBFS
    for name, (x, sub) in clips.items():
        sf.write(str(tmp_path / name), x.astype(np.float32), 16000, subtype=sub)
    assert main(["protect", str(tmp_path / "take.wav"), "--iterations", "0", "-o", str(tmp_path / "t0.wav")]) == 0
    cap = capsys.readouterr()
    assert "--iterations 0" in cap.err and "unchanged" in cap.out
    rc = main(["protect", *(str(tmp_path / n) for n in ("short.wav", "silent.flac", "hum.wav")), "-o",
               str(tmp_path / "out"), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "shorter than 0.5 s" in cap.err and "digital silence" in cap.err and "-65.0 dBFS" in cap.err
    recs = {Path(r["input"]).name: r for r in _json_lines(cap.out)}
    assert all(r["ok"] and r["linf"] == 0 and r["snr_db"] is None and "unchanged" in r["warning"]
               for r in recs.values())
    pairs = [("take.wav", tmp_path / "t0.wav"), ("short.wav", tmp_path / "out" / "short.cloaked.wav"),
             ("silent.flac", tmp_path / "out" / "silent.cloaked.flac"),
             ("hum.wav", tmp_path / "out" / "hum.cloaked.wav")]
    for name, out in pairs:
        assert sf.info(str(out)).subtype == sf.info(str(tmp_path / name)).subtype
        np.testing.assert_array_equal(_read(out), _read(tmp_path / name))


def test_library_protect_with_0_iterations_returns_the_input(bundle: Path, speech: np.ndarray) -> None:
    """Was an IndexError in cloak/protect.py."""
    models = cloak.load_models(str(bundle), "cpu")
    x = speech[:16000].astype(np.float32)
    cfg = cloak.ProtectConfig(iterations=0, repeats=1, t_adv=1, source_frames=32, gender="male")
    r = cloak.protect(x, 16000, models, cfg)
    np.testing.assert_array_equal(r.audio, x)
    assert r.metrics["linf"] == 0 and "unchanged" in r.metrics["note"]


# ------------------------------------------------------------------------------------------ shipped sample


def test_shipped_sample_protect_and_copy(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cloak.sample import sample_path

    src = sample_path()
    info = sf.info(str(src))
    assert src.stat().st_size <= 1_000_000 and 4 <= info.duration <= 6 and (src.parent / "SOURCES.md").is_file()
    assert "CC BY 4.0" in (src.parent / "SOURCES.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["protect", "--sample", "--models", str(bundle), *FAST]) == 0  # written here, not in the package
    out = tmp_path / cli.SAMPLE_OUTPUT
    assert (sf.info(str(out)).format, sf.info(str(out)).subtype, sf.info(str(out)).frames) == (
        "FLAC", "PCM_16", info.frames)
    assert 0 < np.max(np.abs(_read(out) - _read(src))) <= EPS
    assert main(["protect", "--sample", str(out)]) == 2  # --sample takes no other inputs
    assert main(["protect"]) == 2
    assert "--sample" in capsys.readouterr().err
    assert main(["sample", "mine.flac"]) == 0 and (tmp_path / "mine.flac").read_bytes() == src.read_bytes()
    assert "CC BY 4.0" in capsys.readouterr().out
    assert main(["sample", "mine.flac"]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["sample", "--path"]) == 0 and capsys.readouterr().out.strip() == str(src)


def test_output_directory_without_write_permission_fails_before_models_load(speech: np.ndarray, no_models: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as an unprivileged user (root ignores directory permissions): exit 2 before anything is computed."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cloak-cli-perm-"))
    try:
        os.chmod(base, 0o755)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "xdg"))  # readable by that user too
        inp = _mono16(speech[:16000], base / "take.wav")
        os.chmod(inp, 0o644)
        locked = base / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        argv = ["protect", str(inp), "-o", str(locked / "take.cloaked.wav"), "--quiet"]
        if os.geteuid() != 0:
            rc = main(argv)
        else:
            cli.build_parser()  # imports every lazy module now: that user may not read the interpreter's files
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 99
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    code = main(argv)
                finally:
                    os._exit(code)
            rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert rc == 2
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base)
