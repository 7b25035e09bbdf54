"""Tests of cloak.audio: reading and validation, on real speech (the sample shipped with the package; one test
also reads a corpus WAV from the shared data). Writing, the budget and output formats: tests/test_audio_write.py,
which uses this module's clip helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import CORPUS, SAMPLE, need_data
from scipy.signal import resample_poly

from cloak.audio import Audio, read_audio, to_mono, validate_samples, write_audio
from cloak.audio_checks import AudioError

VCTK_WAV = CORPUS / "vctk_p225" / "p225_003.wav"
LIBRI_FLAC = SAMPLE  # LibriSpeech 3331-159605-0003, 16 kHz PCM_16 FLAC, ships with the package


def _need(path: Path) -> Path:
    return need_data(path, "corpus file")


def speech_clip() -> tuple[np.ndarray, int]:
    """One second of real 16 kHz PCM_16 speech (the shipped LibriSpeech sample), read with soundfile directly."""
    data, rate = sf.read(str(SAMPLE), dtype="float32", start=16000, frames=16000)
    assert rate == 16000 and data.ndim == 1
    return data, rate


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    return speech_clip()


def stereo_44k(speech: tuple[np.ndarray, int]) -> np.ndarray:
    x = resample_poly(speech[0].astype(np.float64), 441, 160)
    x *= 0.9 / np.max(np.abs(x))
    return np.stack([x, -0.5 * x[::-1]], axis=1).astype(np.float32)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -------------------------------------------------------------------------------------------------- reading


def test_read_corpus_wav_keeps_everything() -> None:
    path = _need(VCTK_WAV)
    info = sf.info(str(path))
    a = read_audio(path)
    assert isinstance(a, Audio)
    assert a.samples.dtype == np.float32 and a.samples.ndim == 1
    assert (a.sample_rate, a.frames, a.channels) == (info.samplerate, info.frames, 1)
    assert (a.format, a.subtype) == ("WAV", "PCM_16")
    assert a.duration == pytest.approx(info.frames / info.samplerate)
    np.testing.assert_array_equal(a.samples, sf.read(str(path), dtype="float32")[0])


def test_read_corpus_flac() -> None:
    path = _need(LIBRI_FLAC)
    a = read_audio(str(path))
    assert (a.format, a.subtype, a.sample_rate, a.channels) == ("FLAC", "PCM_16", 16000, 1)
    assert a.frames == sf.info(str(path)).frames


def test_round_trip_44k_stereo_float_wav(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x = stereo_44k(speech)
    out = write_audio(tmp_path / "s.wav", x, 44100)
    a = read_audio(out)
    assert (a.format, a.subtype) == ("WAV", "FLOAT")
    assert (a.sample_rate, a.channels, a.frames) == (44100, 2, x.shape[0])
    assert a.samples.shape == x.shape
    np.testing.assert_array_equal(a.samples, x)


def test_round_trip_48k_flac_pcm24(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x = resample_poly(speech[0].astype(np.float64), 3, 1)
    x = (0.9 * x / np.max(np.abs(x))).astype(np.float32)
    out = write_audio(tmp_path / "s.flac", x, 48000)  # FLAC defaults to PCM_24
    a = read_audio(out)
    assert (a.format, a.subtype) == ("FLAC", "PCM_24")
    assert (a.sample_rate, a.channels, a.frames) == (48000, 1, x.shape[0])
    np.testing.assert_allclose(a.samples, x, rtol=0, atol=2.0**-23)  # half an LSB of rounding, plus slack


def test_round_trip_16k_int16_wav_is_bit_exact(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x, rate = speech
    out = write_audio(tmp_path / "s.wav", x, rate, subtype="PCM_16")
    a = read_audio(out)
    assert (a.format, a.subtype, a.sample_rate, a.channels, a.frames) == ("WAV", "PCM_16", 16000, 1, x.size)
    np.testing.assert_array_equal(a.samples, x)  # source is PCM_16: nothing may drift
    # the int16 values written are exactly the corpus file's
    ints, _ = sf.read(str(out), dtype="int16")
    np.testing.assert_array_equal(ints, sf.read(str(SAMPLE), dtype="int16", start=16000, frames=16000)[0])
    # an int16 array in memory writes the same data
    out2 = write_audio(tmp_path / "s2.wav", ints, rate, subtype="PCM_16")
    np.testing.assert_array_equal(sf.read(str(out2), dtype="int16")[0], ints)


def test_pcm16_precision_for_arbitrary_floats(tmp_path: Path) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, 8000).astype(np.float32)
    x[:2] = (1.0, -1.0)
    a = read_audio(write_audio(tmp_path / "r.wav", x, 8000, subtype="PCM_16"))
    # half an LSB of rounding; +1.0 itself maps to the largest code, 32767 / 32768
    np.testing.assert_allclose(a.samples[2:], x[2:], rtol=0, atol=2.0**-16 + 1e-7)
    assert (a.samples[0], a.samples[1]) == (32767 / 32768, -1.0)


@pytest.mark.parametrize(
    ("name", "fmt", "subtype"),
    [
        ("c.aiff", "AIFF", "FLOAT"),
        ("c.aif", "AIFF", "FLOAT"),
        ("c.ogg", "OGG", "VORBIS"),
        ("c.mp3", "MP3", "MPEG_LAYER_III"),
        ("c.unknownext", "WAV", "FLOAT"),
        ("C.WAV", "WAV", "FLOAT"),
    ],
)
def test_format_from_extension(
    tmp_path: Path, speech: tuple[np.ndarray, int], name: str, fmt: str, subtype: str
) -> None:
    x, rate = speech
    a = read_audio(write_audio(tmp_path / name, x, rate))
    assert (a.format, a.subtype, a.sample_rate, a.channels) == (fmt, subtype, rate, 1)
    assert abs(a.frames - x.size) <= 2048  # lossy codecs may pad


def test_explicit_format_and_subtype(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x, rate = speech
    a = read_audio(write_audio(tmp_path / "clip.bin", x, rate, format="flac", subtype="pcm_16"))
    assert (a.format, a.subtype) == ("FLAC", "PCM_16")
    np.testing.assert_array_equal(a.samples, x)
    with pytest.raises(AudioError, match="cannot store subtype"):
        write_audio(tmp_path / "bad.flac", x, rate, subtype="FLOAT")
    with pytest.raises(AudioError, match="unknown audio format"):
        write_audio(tmp_path / "bad.wav", x, rate, format="NOPE")
    assert listing(tmp_path) == ["clip.bin"]


def test_multichannel_file_keeps_2d(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x = np.tile(speech[0][:, None], (1, 3)) * np.array([1.0, 0.5, -0.25], dtype=np.float32)
    a = read_audio(write_audio(tmp_path / "m.wav", x, speech[1]))
    assert a.samples.shape == (x.shape[0], 3) and a.channels == 3


# ----------------------------------------------------------------------------------------- read errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as exc:
        read_audio(path)
    assert str(path) in str(exc.value)


def test_directory_is_not_audio(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="directory"):
        read_audio(tmp_path)


def test_text_file_renamed_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not readable as audio") as exc:
        read_audio(path)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value.__cause__, sf.SoundFileError)


def test_empty_wav(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000)
    assert sf.info(str(path)).frames == 0
    with pytest.raises(AudioError, match="empty") as exc:
        read_audio(path)
    assert str(path) in str(exc.value)


def test_too_short_clip(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    path = tmp_path / "short.wav"
    sf.write(str(path), speech[0][:160], 16000)  # 0.01 s
    with pytest.raises(AudioError, match="too short") as exc:
        read_audio(path)
    assert str(path) in str(exc.value)
    assert read_audio(path, min_seconds=0.0).frames == 160


def test_too_long_clip() -> None:
    path = SAMPLE
    with pytest.raises(AudioError, match="too long"):
        read_audio(path, max_seconds=0.5)


def test_nan_in_file(tmp_path: Path, speech: tuple[np.ndarray, int]) -> None:
    x = speech[0].copy()
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(str(path), x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN") as exc:
        read_audio(path)
    assert "frame 100" in str(exc.value) and str(path) in str(exc.value)


def test_bad_limits() -> None:
    with pytest.raises(AudioError, match="max_seconds"):
        read_audio(SAMPLE, min_seconds=2.0, max_seconds=1.0)


# ------------------------------------------------------------------------------------------ validation


def test_validate_float_arrays(speech: tuple[np.ndarray, int]) -> None:
    x = speech[0].astype(np.float64)
    out = validate_samples(x, 16000)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, speech[0])
    same = validate_samples(speech[0], 16000)
    assert not np.shares_memory(same, speech[0])  # a copy, never the caller's array


@pytest.mark.parametrize(
    ("dtype", "full"),
    [(np.int16, 32768), (np.int32, 2**31)],
)
def test_validate_int_arrays_converted(dtype: type, full: int) -> None:
    info = np.iinfo(dtype)
    x = np.zeros((1600, 2), dtype=dtype)
    x[0] = (info.min, info.max)
    x[1] = (full // 2, -(full // 4))
    before = x.copy()
    out = validate_samples(x, 16000)
    assert out.dtype == np.float32 and out.shape == (1600, 2)
    assert out[0, 0] == -1.0 and out[0, 1] == pytest.approx(1.0, abs=1e-4) and out[0, 1] <= 1.0
    assert (out[1, 0], out[1, 1]) == (0.5, -0.25)
    np.testing.assert_array_equal(x, before)


def test_validate_nan_and_inf() -> None:
    x = np.zeros(1600, dtype=np.float32)
    x[7] = np.nan
    before = x.copy()
    with pytest.raises(AudioError, match=r"myclip: .*NaN.*frame 7"):
        validate_samples(x, 16000, name="myclip")
    np.testing.assert_array_equal(x, before)
    y = np.zeros((1600, 2))
    y[3, 1] = np.inf
    with pytest.raises(AudioError, match="infinite"):
        validate_samples(y, 16000)
    with pytest.raises(AudioError, match="NaN or infinite"):  # beyond float32's range
        validate_samples(np.full(1600, 1e300), 16000)


def test_validate_channels() -> None:
    with pytest.raises(AudioError, match="9 channels") as exc:
        validate_samples(np.zeros((1600, 9), dtype=np.float32), 16000, name="nine")
    assert "nine" in str(exc.value)
    with pytest.raises(AudioError, match="transposed"):
        validate_samples(np.zeros((2, 16000), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="shape"):
        validate_samples(np.zeros((1600, 2, 2), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="0 channels"):
        validate_samples(np.zeros((1600, 0), dtype=np.float32), 16000)
    assert validate_samples(np.zeros((1600, 8), dtype=np.float32), 16000).shape == (1600, 8)


@pytest.mark.parametrize("rate", [4000, 7999, 192001, 16000.0, True, "16000"])
def test_validate_bad_rate(rate: object) -> None:
    with pytest.raises(AudioError, match="sample rate"):
        validate_samples(np.zeros(48000, dtype=np.float32), rate)  # type: ignore[arg-type]


def test_validate_rate_bounds_and_lengths() -> None:
    assert validate_samples(np.zeros(800), 8000).size == 800
    assert validate_samples(np.zeros(19200), np.int64(192000)).size == 19200
    with pytest.raises(AudioError, match="empty"):
        validate_samples(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="too short"):
        validate_samples(np.zeros(160, dtype=np.float32), 16000)  # 0.01 s
    with pytest.raises(AudioError, match="too long"):
        validate_samples(np.zeros(32000, dtype=np.float32), 16000, max_seconds=1.0)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64, np.complex64, object])
def test_validate_bad_dtype(dtype: type) -> None:
    with pytest.raises(AudioError, match="dtype"):
        validate_samples(np.zeros(1600, dtype=dtype), 16000)


def test_to_mono() -> None:
    x = np.stack([np.ones(10), np.zeros(10), -np.ones(10) * 0.5], axis=1).astype(np.float32)
    m = to_mono(x)
    assert m.dtype == np.float32 and m.shape == (10,)
    np.testing.assert_allclose(m, 1 / 6)
    mono = np.arange(5, dtype=np.float64)
    out = to_mono(mono)
    assert out.dtype == np.float32 and out.shape == (5,) and not np.shares_memory(out, mono)
    np.testing.assert_array_equal(to_mono(np.full((4, 2), 16384, dtype=np.int16)), np.full(4, 0.5))


def test_audio_dataclass() -> None:
    a = Audio(np.zeros((48000, 2), dtype=np.float32), 48000, "FLOAT", "WAV")
    assert (a.frames, a.channels, a.duration) == (48000, 2, 1.0)
    with pytest.raises(AttributeError):
        a.sample_rate = 1  # type: ignore[misc]
    with pytest.raises(AudioError, match="float32"):
        Audio(np.zeros(10), 16000)
