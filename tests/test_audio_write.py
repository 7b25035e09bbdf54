"""Tests of cloak.audio's writing (atomic, no silent clipping, bit-exact PCM), the epsilon budget on stored samples
(fit_to_budget), the subtype of a protected copy, pass-through clips and output checks, on real speech (the sample
shipped with the package)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_audio import listing, speech_clip, stereo_44k

from cloak import audio as audio_mod
from cloak.audio import read_audio, write_audio
from cloak.audio_checks import AudioError


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    return speech_clip()


# --------------------------------------------------------------------------------------------- writing


def test_overwrite_refused(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x, rate = speech
    target = write_audio(tmp_path / "out.wav", x, rate)
    original = target.read_bytes()
    with pytest.raises(AudioError, match="already exists") as exc:
        write_audio(target, -x, rate)
    assert str(target) in str(exc.value)
    assert target.read_bytes() == original
    write_audio(target, -x, rate, overwrite=True)
    np.testing.assert_array_equal(read_audio(target).samples, -x)
    assert listing(tmp_path) == ["out.wav"]


def test_protect_original(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x, rate = speech
    orig = tmp_path / "voice.wav"
    sf.write(str(orig), x, rate, subtype="PCM_16")
    original = orig.read_bytes()
    sub = tmp_path / "sub"
    sub.mkdir()
    for spelling in (orig, str(orig), sub / ".." / "voice.wav"):
        with pytest.raises(AudioError, match="would overwrite the original"):
            write_audio(spelling, x * 0.5, rate, overwrite=True, protect_original=orig)
    (tmp_path / "link.wav").symlink_to(orig)
    with pytest.raises(AudioError, match="would overwrite the original"):
        write_audio(tmp_path / "link.wav", x * 0.5, rate, overwrite=True, protect_original=orig)
    assert orig.read_bytes() == original
    write_audio(tmp_path / "voice.cloaked.wav", x * 0.5, rate, protect_original=orig)


def test_no_silent_clipping(tmp_path: Path) -> None:
    x = np.linspace(-1.5, 1.5, 1600, dtype=np.float32)
    for name, subtype in (("a.wav", "PCM_16"), ("b.flac", None), ("c.wav", "PCM_24"), ("d.ogg", None)):
        with pytest.raises(AudioError, match="outside \\[-1, 1\\]") as exc:
            write_audio(tmp_path / name, x, 16000, subtype=subtype)
        assert name in str(exc.value)
    assert listing(tmp_path) == []
    a = read_audio(write_audio(tmp_path / "f.wav", x, 16000))  # float keeps the overs
    np.testing.assert_array_equal(a.samples, x)


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="NaN"):
        write_audio(tmp_path / "n.wav", np.full(100, np.nan), 16000)
    with pytest.raises(AudioError, match="empty"):
        write_audio(tmp_path / "e.wav", np.zeros(0), 16000)
    with pytest.raises(AudioError, match="does not exist"):
        write_audio(tmp_path / "no" / "dir.wav", np.zeros(100), 16000)
    with pytest.raises(AudioError, match="is a directory"):
        write_audio(tmp_path, np.zeros(100), 16000, overwrite=True)
    assert listing(tmp_path) == []


def _failing_write(seen: list[Path]) -> Callable[..., None]:
    def fake_write(file: str | Path, *args: object, **kwargs: object) -> None:
        p = Path(file)
        seen.append(p)
        assert p.name.startswith(".") and p.name.endswith(".partial") and p.exists()
        p.write_bytes(b"RIFF half written")
        raise OSError("disk full")

    return fake_write


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_failure(
    tmp_path: Path, speech: tuple[np.ndarray, int], monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    x, rate = speech
    target = tmp_path / "out.wav"
    if existing:
        sf.write(str(target), x, rate, subtype="PCM_16")
    before = target.read_bytes() if existing else None
    seen: list[Path] = []
    monkeypatch.setattr(audio_mod, "_sf_write", _failing_write(seen))
    with pytest.raises(OSError, match="disk full"):
        write_audio(target, x * 0.5, rate, overwrite=True)
    assert len(seen) == 1 and seen[0].parent == tmp_path and not seen[0].exists()
    assert listing(tmp_path) == (["out.wav"] if existing else [])
    if existing:
        assert target.read_bytes() == before


def test_atomic_write_replace_failure(
    tmp_path: Path, speech: tuple[np.ndarray, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, rate = speech
    target = write_audio(tmp_path / "out.flac", x, rate)
    before = target.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(audio_mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_audio(target, x * 0.5, rate, overwrite=True)
    assert listing(tmp_path) == ["out.flac"]
    assert target.read_bytes() == before


def test_soundfile_error_wrapped(tmp_path: Path) -> None:
    # MP3 cannot be encoded at 96 kHz: libsndfile's error becomes an AudioError naming the file
    path = tmp_path / "hi.mp3"
    with pytest.raises(AudioError, match="could not write") as exc:
        write_audio(path, np.zeros(9600, dtype=np.float32), 96000)
    assert str(path) in str(exc.value)
    assert listing(tmp_path) == []


def test_new_file_permissions_follow_umask(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    old = os.umask(0o022)
    try:
        out = write_audio(tmp_path / "p.wav", *speech)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------- budget, formats, determinism

EPS = 0.002


@pytest.mark.parametrize(("subtype", "bits"), [("PCM_16", 16), ("PCM_24", 24), ("PCM_32", 32)])
def test_fit_to_budget_rounds_toward_the_input_where_nearest_breaks_the_bound(subtype: str, bits: int) -> None:
    full = 2.0 ** (bits - 1)
    eps = 65.7 / full  # 65.7 steps: nearest rounding of x + eps gives 66 steps, beyond the budget
    x = np.array([0.0, 0.25, -0.5, 1000 / full, -(2.0**-3)], dtype=np.float64)  # samples on the grid
    out = x + np.array([eps, -eps, eps, -eps * 0.5, 3 * eps])  # full budget, half of it, and beyond it
    y = audio_mod.fit_to_budget(out, x, eps, subtype)
    assert y.dtype == (np.float64 if bits > 24 else np.float32)
    q = y.astype(np.float64) * full
    np.testing.assert_array_equal(q, np.rint(q))  # on the subtype's grid
    assert np.max(np.abs(y.astype(np.float64) - x)) <= eps
    assert q[0] == 65 and q[1] == 0.25 * full - 65 and q[2] == -0.5 * full + 65  # toward x, not to 66
    assert q[3] == np.rint(1000 - 65.7 / 2)  # inside the budget: plain nearest rounding
    assert q[4] == -(2.0**-3) * full + 65  # beyond the budget: clipped onto its edge


def test_fit_to_budget_at_the_default_epsilon_pcm16() -> None:
    x = np.zeros(3)
    y = audio_mod.fit_to_budget(np.array([EPS, -EPS, 0.4 * EPS]), x, EPS, "PCM_16") * 32768
    assert EPS * 32768 == pytest.approx(65.536) and list(y) == [65, -65, 26]


def test_fit_to_budget_keeps_the_grid_point_nearest_the_input_when_none_fits() -> None:
    x = np.array([0.3], dtype=np.float64)  # float input, not on the 8-bit grid; eps below half a step
    y = audio_mod.fit_to_budget(np.array([0.31]), x, 0.001, "PCM_S8")
    assert y[0] == np.rint(0.3 * 128) / 128


def test_output_subtype_keeps_pcm_and_float_and_upgrades_what_cannot_hold_delta() -> None:
    keep = [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
            ("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("AIFF", "PCM_16"), ("AIFF", "FLOAT")]
    for fmt, sub in keep:
        assert audio_mod.output_subtype(fmt, sub, EPS) == (sub, None)
    for fmt, sub, want in [("WAV", "PCM_U8", "PCM_16"), ("FLAC", "PCM_S8", "PCM_16"), ("WAV", "ULAW", "PCM_16"),
                           ("WAV", "IMA_ADPCM", "PCM_16"), ("WAV", "VORBIS", "FLOAT"), ("FLAC", "FLOAT", "PCM_24"),
                           ("WAV", "MPEG_LAYER_III", "FLOAT")]:
        got, note = audio_mod.output_subtype(fmt, sub, EPS)
        assert got == want and note, (fmt, sub)
    # a budget below one 16-bit step: 24-bit keeps the perturbation
    assert audio_mod.output_subtype("WAV", "PCM_16", 2e-5)[0] == "PCM_24"


@pytest.mark.parametrize(("name", "subtype"), [("f.wav", "FLOAT"), ("d.wav", "DOUBLE"), ("f.aiff", "FLOAT")])
def test_float_files_have_no_peak_chunk_and_same_samples_same_bytes(
    tmp_path: Path, speech: tuple[np.ndarray, int], name: str, subtype: str
) -> None:
    """libsndfile's PEAK chunk stores the time of writing: with it two writes of one clip differ in bytes."""
    x = stereo_44k(speech)
    a = write_audio(tmp_path / name, x, 44100, subtype=subtype).read_bytes()
    b = write_audio(tmp_path / ("2" + name), x, 44100, subtype=subtype).read_bytes()
    assert b"PEAK" not in a and a == b
    np.testing.assert_array_equal(sf.read(str(tmp_path / name), dtype="float32")[0], x)


def test_pcm32_and_double_are_written_from_float64_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ints = rng.integers(-(2**31), 2**31 - 1, 4000)
    x = ints / 2.0**31  # float32 cannot hold these
    assert not np.array_equal(x.astype(np.float32).astype(np.float64), x)
    write_audio(tmp_path / "p.wav", x, 16000, subtype="PCM_32")
    np.testing.assert_array_equal(sf.read(str(tmp_path / "p.wav"), dtype="int32")[0], ints)
    write_audio(tmp_path / "d.wav", x, 16000, subtype="DOUBLE")
    np.testing.assert_array_equal(audio_mod.read_exact(tmp_path / "d.wav"), x)


def test_passthrough_reason_short_and_silent(speech: tuple[np.ndarray, int]) -> None:
    x, rate = speech
    assert audio_mod.passthrough_reason(x, rate) is None
    assert "shorter than 0.5 s" in (audio_mod.passthrough_reason(x[: int(0.49 * rate)], rate) or "")
    assert "digital silence" in (audio_mod.passthrough_reason(np.zeros(rate, np.float32), rate) or "")
    hum = (x * (10 ** (-61 / 20) / np.max(np.abs(x)))).astype(np.float32)  # peak -61 dBFS
    assert "-61.0 dBFS" in (audio_mod.passthrough_reason(hum, rate) or "")
    assert audio_mod.passthrough_reason(hum * 2, rate) is None  # -55 dBFS: quiet, but not silence


def _as_nobody(fn: Callable[[], str | None]) -> str | None:
    """Run fn as an unprivileged user when we are root (root ignores directory permissions)."""
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, (fn() or "").encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        got = fh.read().decode()
    os.waitpid(pid, 0)
    return got or None


def test_output_problem(tmp_path: Path) -> None:
    import tempfile

    assert audio_mod.output_problem(tmp_path / "x.wav") is None
    assert listing(tmp_path) == []  # the probe file is gone
    assert "does not exist" in (audio_mod.output_problem(tmp_path / "no" / "x.wav") or "")
    assert audio_mod.output_problem(tmp_path / "no" / "deeper" / "x.wav", create_dirs=True) is None
    (tmp_path / "file").write_text("x")
    assert "is a file" in (audio_mod.output_problem(tmp_path / "file" / "x.wav") or "")
    assert "is a file" in (audio_mod.output_problem(tmp_path / "file" / "d" / "x.wav", create_dirs=True) or "")
    base = Path(tempfile.mkdtemp(prefix="cloak-perm-"))  # reachable by an unprivileged user
    try:
        os.chmod(base, 0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        rw = base / "rw"
        rw.mkdir()
        os.chmod(rw, 0o777)
        assert "not writable" in (_as_nobody(lambda: audio_mod.output_problem(ro / "x.wav")) or "")
        assert _as_nobody(lambda: audio_mod.output_problem(rw / "x.wav")) is None
    finally:
        os.chmod(base / "ro", 0o755)
        import shutil

        shutil.rmtree(base)
