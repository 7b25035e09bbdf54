"""`cloak protect` fails fast and passes through: bad flags, unusable inputs and outputs are reported before any
model loads; 0 iterations, short and silent clips come back unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_helpers import (  # noqa: F401 - fixtures are found by name (autouse ones, and arguments)
    bundle_fixture,
    clean_env,
    json_lines,
    mono16,
    no_models_fixture,
    one_torch_thread,
    read_2d,
    speech_fixture,
)

import cloak
from clients import cli
from clients.cli import main

# ------------------------------------------------------------------------------------ fail fast, pass through


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
    inp = mono16(speech[:16000], tmp_path / "a.wav")
    assert main(["protect", str(inp), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert line in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_unusable_input_or_output_fails_before_models_load(tmp_path: Path, speech: np.ndarray, no_models: None,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    good = mono16(speech[:16000], tmp_path / "good.wav")
    assert main(["protect", str(tmp_path / "missing.wav"), "--json"]) == 3
    cap = capsys.readouterr()
    assert "missing.wav: no such file" in cap.err and json_lines(cap.out)[0]["exit_code"] == 3
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
    recs = {Path(r["input"]).name: r for r in json_lines(cap.out)}
    assert all(r["ok"] and r["linf"] == 0 and r["snr_db"] is None and "unchanged" in r["warning"]
               for r in recs.values())
    pairs = [("take.wav", tmp_path / "t0.wav"), ("short.wav", tmp_path / "out" / "short.cloaked.wav"),
             ("silent.flac", tmp_path / "out" / "silent.cloaked.flac"),
             ("hum.wav", tmp_path / "out" / "hum.cloaked.wav")]
    for name, out in pairs:
        assert sf.info(str(out)).subtype == sf.info(str(tmp_path / name)).subtype
        np.testing.assert_array_equal(read_2d(out), read_2d(tmp_path / name))


def test_library_protect_with_0_iterations_returns_the_input(bundle: Path, speech: np.ndarray) -> None:
    """Was an IndexError in cloak/protect.py."""
    models = cloak.load_models(str(bundle), "cpu")
    x = speech[:16000].astype(np.float32)
    cfg = cloak.ProtectConfig(iterations=0, repeats=1, t_adv=1, source_frames=32, gender="male")
    r = cloak.protect(x, 16000, models, cfg)
    np.testing.assert_array_equal(r.audio, x)
    assert r.metrics["linf"] == 0 and "unchanged" in r.metrics["note"]


def test_output_directory_without_write_permission_fails_before_models_load(speech: np.ndarray, no_models: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as an unprivileged user (root ignores directory permissions): exit 2 before anything is computed."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cloak-cli-perm-"))
    try:
        os.chmod(base, 0o755)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "xdg"))  # readable by that user too
        inp = mono16(speech[:16000], base / "take.wav")
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
