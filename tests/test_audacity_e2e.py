"""End to end against a REAL Audacity 3.x (Debian's audacity + mod-script-pipe) under Xvfb.

A private HOME whose config enables mod-script-pipe, TempDir in the test folder, two starts (see
tests/audacity_harness.py). A corpus clip is imported as 44.1 kHz stereo, 1.0-3.0 s is selected, and the one-shot
command (new track, --replace) and the macro + watch flow run with the real cloak.protect on a tiny model bundle.
The project's tracks are then exported and compared sample by sample with the original.

Skipped, with the reason, only where Audacity or Xvfb is not installed (`.ci/run` installs them with apt) or
cannot be started.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Audacity e2e harness is Linux-only")

from audacity_harness import AudacityHarness, Unavailable  # noqa: E402
from conftest import CORPUS, make_bundle, need_data, to_rate  # noqa: E402

from clients.audacity.cli import register_audacity, run_audacity  # noqa: E402
from clients.audacity.macro import DONE  # noqa: E402
from clients.audacity.pipe import PipeClient  # noqa: E402

EPS = 0.002
RATE = 44100
WAV_PREF = "/FileFormats/ExportFormat_SF1_Type/WAV_10000"


def _skip(reason: str) -> None:
    warnings.warn(reason, UserWarning, stacklevel=2)  # shown in pytest's summary even without -rs
    pytest.skip(reason)


@pytest.fixture(scope="module")
def audacity(tmp_path_factory):
    try:
        AudacityHarness.check()
    except Unavailable as e:
        _skip(f"real-Audacity test skipped: {e}")
    h = AudacityHarness(tmp_path_factory.mktemp("audacity"))  # config + macro written by `install`
    try:
        h.start()
    except Unavailable as e:
        h.stop()
        _skip(f"real-Audacity test skipped: Audacity could not be started: {e} (logs in {h.log_dir})")
    yield h
    h.stop()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    import torch

    import cloak

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread is ~50x faster than two busy ones
    models = cloak.load_models(str(make_bundle(tmp_path_factory.mktemp("models") / "bundle")), "cpu")
    cfg = cloak.ProtectConfig(iterations=2, repeats=1, t_adv=2, source_frames=32, gender="male")
    yield lambda audio, rate: cloak.protect(audio, rate, models, cfg).audio
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, np.ndarray]:
    files = sorted(need_data(CORPUS / "vctk_p225", "corpus speaker vctk_p225").glob("*.wav"))
    x, sr = sf.read(str(files[0]), dtype="float32")
    y = to_rate(x, sr, RATE)
    stereo = np.stack([y, 0.8 * y], axis=1).astype(np.float32)
    path = tmp_path_factory.mktemp("clip") / "p225 take.wav"
    sf.write(str(path), stereo, RATE, subtype="FLOAT")
    return path, stereo


@pytest.fixture
def project(audacity, clip):
    """A project holding just the clip, 1.0-3.0 s selected on it; yields a connected client."""
    with PipeClient(timeout=20) as c:
        c.command("SelectAll:")
        c.command("RemoveTracks:")
        c.command(f'Import2: Filename="{clip[0]}"', timeout=60)
        tracks = c.tracks()
        assert [t["name"] for t in tracks] == ["p225 take"]
        c.command("Select: Start=1 End=3 Track=0 TrackCount=1 Mode=Set")
        yield c


def cli(argv: list[str], processor, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    register_audacity(parser.add_subparsers(dest="command"))
    rc = run_audacity(parser.parse_args(["audacity", *argv]), processor=processor, epsilon=EPS)
    out, err = capsys.readouterr()
    return rc, out, err


def export_track(c: PipeClient, index: int, folder: Path, seconds: float) -> np.ndarray:
    c.command(f'SetPreference: Name="{WAV_PREF}" Value=6')
    c.command(f"Select: Start=0 End={seconds} Track={index} TrackCount=1 Mode=Set")
    path = folder / f"track{index}-{time.monotonic_ns()}.wav"
    c.command(f'Export2: Filename="{path}" NumChannels=2', timeout=60)
    info = sf.info(str(path))
    assert info.subtype == "FLOAT" and info.samplerate == RATE and info.channels == 2
    y, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return y


def assert_cloaked(orig: np.ndarray, new: np.ndarray) -> None:
    diff = np.abs(new.astype(np.float64) - orig.astype(np.float64))
    assert diff.max() > 0, "the cloaked audio equals the original"
    assert diff.max() <= EPS + 1e-7, f"max |delta| {diff.max()} > epsilon"


def check_new_track(c: PipeClient, x: np.ndarray, folder: Path) -> None:
    s0, s1 = RATE, 3 * RATE
    tracks = c.tracks()
    assert [t["name"] for t in tracks if t["kind"] == "wave"] == ["p225 take", "p225 take (cloaked)"]
    new = next(i for i, t in enumerate(tracks) if t["name"] == "p225 take (cloaked)")
    clips = [cl for cl in c.clips() if cl["track"] == new]
    assert len(clips) == 1 and abs(clips[0]["start"] - 1.0) < 1e-6 and abs(clips[0]["end"] - 3.0) < 1e-6
    seconds = len(x) / RATE + 1
    orig = export_track(c, 0, folder, seconds)
    assert orig.shape == x.shape and np.array_equal(orig, x), "the original track was modified"
    y = export_track(c, new, folder, seconds)
    if len(y) == s1:  # export starts at 0 s: silence up to the clip
        assert not np.any(y[:s0]), "the cloaked clip does not start at sample 44100"
        y = y[s0:]
    assert len(y) == s1 - s0, f"cloaked clip has {len(y)} samples, expected {s1 - s0}"
    assert_cloaked(x[s0:s1], y)


def test_cloak_selection_adds_a_cloaked_track(project, clip, processor, capsys, tmp_path):
    t = time.monotonic()
    rc, out, err = cli(["cloak-selection", "--json"], processor, capsys)
    assert rc == 0, err
    rec = json.loads(out)
    assert rec["mode"] == "new-track" and rec["tracks"][0]["start_sample"] == RATE
    assert rec["tracks"][0]["end_sample"] == 3 * RATE and 0 < rec["tracks"][0]["linf"] <= EPS
    print(f"cloak-selection (new track) took {time.monotonic() - t:.1f} s")
    check_new_track(project, clip[1], tmp_path)
    project.command("Undo:")  # one step takes the cloaked track back
    assert [t["name"] for t in project.tracks()] == ["p225 take"]


def test_cloak_selection_replace_is_one_undo_step(project, clip, processor, capsys, tmp_path):
    x = clip[1]
    rc, out, err = cli(["cloak-selection", "--replace", "-q"], processor, capsys)
    assert rc == 0, err
    assert "replaced in place" in out
    tracks = project.tracks()
    assert [t["name"] for t in tracks] == ["p225 take"]
    y = export_track(project, 0, tmp_path, len(x) / RATE + 1)
    assert y.shape == x.shape, "the track length changed"
    s0, s1 = RATE, 3 * RATE
    assert np.array_equal(y[:s0], x[:s0]) and np.array_equal(y[s1:], x[s1:]), "audio outside the range changed"
    assert_cloaked(x[s0:s1], y[s0:s1])
    project.command("Undo:")
    assert np.array_equal(export_track(project, 0, tmp_path, len(x) / RATE + 1), x), "one Undo did not restore"


def test_macro_marks_and_watch_cloaks(project, clip, processor, capsys, tmp_path):
    project.command("Macro_CloakSelection:")  # = Tools > Apply Macro > Cloak selection
    labels = project.labels()
    texts = [lab[2] for _, items in labels for lab in items]
    assert texts == ["cloak:pending tracks=0 start=1.000000000 end=3.000000000"]
    rc, out, err = cli(["watch", "--once", "--json"], processor, capsys)
    assert rc == 0, err
    rec = json.loads(out.splitlines()[0])
    assert rec["ok"] and rec["tracks"][0]["new_track"] == "p225 take (cloaked)"
    texts = [lab[2] for _, items in project.labels() for lab in items]
    assert texts == [DONE]
    check_new_track(project, clip[1], tmp_path)


def test_empty_selection_is_refused_without_blocking_audacity(project, processor, capsys):
    project.command("Select: Start=2 End=2 Track=0 TrackCount=1 Mode=Set")
    rc, out, err = cli(["cloak-selection", "--pipe-timeout", "5"], processor, capsys)
    assert rc == 3 and "selection is empty" in err
    assert [t["name"] for t in project.tracks()] == ["p225 take"]  # and Audacity still answers
