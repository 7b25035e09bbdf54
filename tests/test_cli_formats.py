"""`cloak protect` keeps formats: every writable subtype comes back in kind within the bound, PCM and float files
end to end with the same bytes on reruns."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_helpers import (  # noqa: F401 - fixtures are found by name (autouse ones, and arguments)
    EPS,
    FAST,
    bundle_fixture,
    clean_env,
    fake_engine,
    json_lines,
    one_torch_thread,
    read_2d,
    speech_fixture,
)

from clients.cli import main

# ------------------------------------------------------------------- formats kept, byte-identical outputs


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
    calls = fake_engine(monkeypatch)
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
        rec = json_lines(cap.out)[0]
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
    ref, got = read_2d(inp), read_2d(outs[0])
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
        recs = {Path(r["input"]).name: r for r in json_lines(cap.out)}
        assert set(recs) == set(inputs)
        for name, sub in inputs.items():
            out = Path(recs[name]["output"])
            assert sf.info(str(out)).subtype == sub
            diff = np.abs(read_2d(out) - read_2d(src / name))
            assert 0 < diff.max() <= EPS
        digests.append({n: hashlib.sha256(Path(r["output"]).read_bytes()).hexdigest() for n, r in recs.items()})
    assert digests[0] == digests[1]
    raw = (tmp_path / "a" / "f32.cloaked.wav").read_bytes()
    assert b"PEAK" not in raw  # no timestamped chunk


