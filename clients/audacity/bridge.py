"""The "Cloak selection" workflow: Audacity selection -> 32-bit float WAV -> cloak -> back into the project.

Facts about Audacity 3.2 this relies on (verified against Debian's 3.2.4 under Xvfb, see tests/test_audacity_e2e.py):
SetClip, SetTrack and effects run from the pipe (Nyquist Prompt) change the project *without* pushing an undo
state, while Import2, AddLabel, SetLabel, Paste and RemoveTracks push one; a later Undo reverts such "dangling"
changes too, and a Redo does not bring them back. The workflow leaves none behind, and every Undo it issues undoes
exactly a state it has just pushed itself (each one is checked).

1. **Where exactly.** GetInfo reports times with ~6 significant digits. One-shot mode first makes sure the
   selection is not empty (a Nyquist effect on an empty selection opens a modal dialog that blocks the pipe): it adds
   a label at the selection (``AddLabel``, which never opens a dialog), reads it, and undoes it. Then a Nyquist probe
   (``macro.PROBE_NYQUIST``) reports the exact selection start, its length in samples and, per selected wave track,
   the sample rate, the project rate, the track's extent and sample format, through Audacity preferences: it does
   not modify the project. The range is snapped to samples and clamped to the track's audio.
2. **Refuse what would not round-trip.** Export mixes: a muted track (or another soloed one), a gain other than 0 dB,
   a pan other than centre, a volume envelope, or a track rate other than the project rate would change the
   exported samples; such tracks are refused with a message saying what to change. ``--replace`` also needs a
   32-bit float track (pasting into 16/24-bit tracks re-quantizes and dithers).
3. **Export** the range of each track alone with ``Export2`` as WAV, after setting Audacity's WAV encoding preference
   to 32-bit float (restored afterwards); the file is checked (float, rate, channels, frame count).
4. **Cloak** with the injected processor (local models or a server); ``|out - in| <= epsilon`` is then enforced
   exactly. Nothing in the project has been changed up to here.
5. **Place, as one undo step.** ``Import2`` each cloaked file (named "<track> (cloaked).wav", so the track gets that
   name), move its clip to the range start with ``SetClip`` (sample-exact: ``s0/rate`` with 6 decimals rounds back to
   sample ``s0``), ``Copy`` the imported tracks from 0 s, ``Undo`` the imports (the clipboard survives), then
   ``Paste``: default mode with no track selected, which makes new tracks ("<name> (cloaked)") holding the clips at
   their positions; ``--replace`` over the range on the original tracks. Either way the project history gains exactly
   one "Paste" entry (per distinct range in replace mode), and Edit > Undo takes the whole cloak back.

On any failure the tracks this run imported are removed, a paste that fails its check is undone, the export
preference is restored and the selection re-selected: the project is left as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloak.audio import fit_to_budget

from .macro import PROBE_NYQUIST, PROBE_PREF, nyquist_command
from .pipe import AudacityError, CommandFailed, PipeClient, as_bool, format_command

__all__ = [
    "Bridge",
    "BridgeCancelled",
    "BridgeError",
    "CloakOutcome",
    "Processor",
    "SelectionError",
    "TrackInfo",
    "TrackResult",
    "fit_to_budget",
]

Processor = Callable[[np.ndarray, int], np.ndarray]
"""process(audio, sample_rate) -> cloaked audio of the same shape (float32, frames first)."""

WAV_FLOAT_PREF = "/FileFormats/ExportFormat_SF1_Type/WAV_10000"  # SF_FORMAT_WAV's encoding; 6 = SF_FORMAT_FLOAT
SF_FORMAT_FLOAT = "6"
MIN_SECONDS = 0.1


class BridgeError(AudacityError):
    """The workflow could not be completed; the project was left as it was."""


class SelectionError(BridgeError):
    """Nothing (usable) is selected, or a selected track cannot be cloaked as it is."""


class BridgeCancelled(BridgeError):
    """The run was cancelled; the project was left as it was."""


@dataclass
class TrackInfo:
    index: int
    name: str
    kind: str
    selected: bool = False
    channels: int = 1
    start: float = 0.0
    end: float = 0.0
    gain: float = 1.0
    pan: float = 0.0
    mute: bool = False
    solo: bool = False

    @classmethod
    def from_getinfo(cls, index: int, d: dict[str, Any]) -> TrackInfo:
        def num(key: str, default: float) -> float:
            try:
                return float(d.get(key, default))
            except (TypeError, ValueError):
                return default

        return cls(index=index, name=str(d.get("name", "")), kind=str(d.get("kind", "")),
                   selected=as_bool(d.get("selected", 0)), channels=int(num("channels", 1)),
                   start=num("start", 0.0), end=num("end", 0.0), gain=num("gain", 1.0), pan=num("pan", 0.0),
                   mute=as_bool(d.get("mute", 0)), solo=as_bool(d.get("solo", 0)))


@dataclass
class Probe:
    start: float  # selection start, seconds (exact)
    length: int  # selection length in this track's samples
    rate: int  # track rate
    project_rate: int
    track_start: float
    track_end: float
    sample_format: str  # "16", "24" or "32" (float)

    @classmethod
    def parse(cls, text: str) -> Probe:
        p = text.split()
        if len(p) != 7:
            raise ValueError(f"expected 7 fields, got {text!r}")
        fmt = float(p[6])
        return cls(start=float(p[0]), length=int(float(p[1])), rate=round(float(p[2])),
                   project_rate=round(float(p[3])), track_start=float(p[4]), track_end=float(p[5]),
                   sample_format=str(int(fmt)))


@dataclass
class _Job:
    track: TrackInfo
    s0: int
    s1: int
    rate: int
    src: Path | None = None
    out: Path | None = None
    linf: float = 0.0
    snr_db: float = math.inf
    seconds: float = 0.0

    @property
    def t0(self) -> float:
        return self.s0 / self.rate

    @property
    def t1(self) -> float:
        return self.s1 / self.rate


@dataclass
class TrackResult:
    track: str
    track_index: int
    start: float
    end: float
    start_sample: int
    end_sample: int
    sample_rate: int
    channels: int
    linf: float
    snr_db: float
    seconds: float
    new_track: str | None  # default mode: name of the added track

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CloakOutcome:
    mode: str  # "new-track" or "replace"
    tracks: list[TrackResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "mode": self.mode, "tracks": [t.to_dict() for t in self.tracks],
                "skipped": self.skipped, "warnings": self.warnings}


def _t(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".") or "0"


def _file_stem(name: str) -> str:
    """A file name stem that Audacity turns back into `name` as the imported track's name (when possible)."""
    stem = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", name).strip(" .") or "cloaked"
    return stem[:150]


class Bridge:
    """Cloak ranges of an open Audacity project through a connected :class:`PipeClient`.

    ``process`` is any ``(audio, rate) -> audio`` function (tests pass a fast one); ``epsilon`` is the l-inf budget
    enforced on what goes back into the project. ``cancelled`` is polled between steps (e.g. a CancelToken's
    ``lambda: token.cancelled``); when it turns true the run is rolled back and :class:`BridgeCancelled` raised.
    ``before_paste`` runs right before the final Paste (the watch mode sets its label to done there, so that the
    Paste's undo state includes it).
    """

    def __init__(self, client: PipeClient, process: Processor, *, epsilon: float = 0.002, replace: bool = False,
                 suffix: str = " (cloaked)", workdir: Path | None = None, log: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, io_timeout: float = 60.0) -> None:
        self.c = client
        self.process = process
        self.epsilon = float(epsilon)
        self.replace = replace
        self.suffix = suffix
        self.workdir = workdir
        self.log = log or (lambda msg: None)
        self.cancelled = cancelled or (lambda: False)
        self.io_timeout = io_timeout
        self.before_paste: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------- small helpers
    def tracks(self) -> list[TrackInfo]:
        return [TrackInfo.from_getinfo(i, d) for i, d in enumerate(self.c.tracks())]

    def labels(self) -> list[tuple[int, float, float, str]]:
        """(label track index, start, end, text) of every label, in SetLabel's global order."""
        out = []
        for entry in self.c.labels():
            if not isinstance(entry, list) or len(entry) != 2:
                continue
            track, items = entry
            for item in items:
                if isinstance(item, list) and len(item) >= 3:
                    out.append((int(track), float(item[0]), float(item[1]), str(item[2])))
        return out

    def _check_cancel(self) -> None:
        if self.cancelled():
            raise BridgeCancelled("cancelled")

    def select(self, t0: float, t1: float, tracks: Sequence[int]) -> None:
        """Select [t0, t1] on exactly these tracks."""
        if not tracks:
            self.c.do("SelectNone")
            self.c.do("SelectTime", Start=t0, End=t1)
            return
        self.c.do("Select", Start=t0, End=t1, Track=tracks[0], TrackCount=1, Mode="Set")
        for i in tracks[1:]:
            self.c.do("SelectTracks", Track=i, TrackCount=1, Mode="Add")

    def _undo_expecting(self, n_tracks: int, what: str) -> None:
        """Undo once and check that the project has `n_tracks` tracks again."""
        self.c.do("Undo")
        now = len(self.c.tracks())
        if now != n_tracks:
            raise BridgeError(f"undoing the {what} left {now} tracks instead of {n_tracks}; check the project "
                              "(View > Undo History)")

    def _remove_tracks(self, indices: Sequence[int]) -> None:
        for i in sorted(indices, reverse=True):
            with contextlib.suppress(AudacityError):
                self.c.do("Select", Start=0, End=0, Track=i, TrackCount=1, Mode="Set")
                self.c.do("RemoveTracks")

    def _rollback_imports(self, imported: list[int], names: list[str], n: int) -> None:
        """Take back tracks this run imported: Undo their Import2 states (checked one by one), else remove those
        that are still there under their names."""
        left = list(imported)
        with contextlib.suppress(AudacityError):
            while left and len(self.c.tracks()) == n + len(left):
                self._undo_expecting(n + len(left) - 1, "import")
                left.pop()
        if left:
            with contextlib.suppress(AudacityError):
                now = self.tracks()
                self._remove_tracks([i for i in left if i < len(now) and now[i].name in names])

    # ------------------------------------------------------------------------------------- reading
    def _guard_and_probe(self, tracks: list[TrackInfo], wave: list[TrackInfo]) -> dict[int, Probe]:
        """Probe the current selection, but only once it is known not to be empty: a Nyquist effect on an empty
        selection opens a modal dialog that blocks the pipe, AddLabel never does. So: AddLabel, read the new label,
        probe if it spans time, then undo the label (checked: same tracks, same labels as before). The probe runs
        before that Undo because Undo also restores the selection of the previous undo state."""
        before_tracks = [(t.name, t.kind) for t in tracks]
        before = self.labels()
        self.c.do("AddLabel")
        failing = True
        try:
            after = self.labels()
            new = list((Counter(after) - Counter(before)).elements())
            if not new:
                raise BridgeError("could not read the selection (AddLabel added no label)")
            _, start, end, _ = new[0]
            self._seen_selection = (start, end)
            if end - start <= 0:
                raise SelectionError("the selection is empty: drag over the audio to cloak, then try again")
            probes = self.probe(wave)
            failing = False
            return probes
        finally:
            try:
                self.c.do("Undo")
                clean = [(t.name, t.kind) for t in self.tracks()] == before_tracks and self.labels() == before
            except AudacityError:
                if not failing:
                    raise
                clean = True  # the original error says more (e.g. a dialog blocks Audacity)
            if not clean:
                raise BridgeError("could not remove the temporary selection label again (an unsaved scripted "
                                  "change was undone with it?); check the project (View > Undo History)")

    def probe(self, selected_wave: list[TrackInfo]) -> dict[int, Probe]:
        """Exact selection start/length, rates, extents and formats of the selected wave tracks. The current
        selection must be non-empty and contain exactly these wave tracks (else Audacity shows a modal dialog)."""
        n = len(selected_wave)
        for k in range(1, n + 1):
            self.c.do("SetPreference", Name=f"{PROBE_PREF}{k}", Value="")
        reply = self.c.raw(nyquist_command(PROBE_NYQUIST), timeout=max(self.c.timeout, 15.0))
        if not reply.ok:
            raise BridgeError("Audacity's Nyquist Prompt is needed to read the selection exactly but failed: "
                              f"{reply.output.strip() or reply.status}")
        probes: dict[int, Probe] = {}
        for k in range(1, n + 1):
            r = self.c.raw(format_command("GetPreference", Name=f"{PROBE_PREF}{k}"))
            text = r.output.strip() if r.ok else ""
            if text:
                try:
                    probes[selected_wave[k - 1].index] = Probe.parse(text)
                except ValueError as e:
                    raise BridgeError(f"the selection probe answered something unexpected: {e}") from e
            with contextlib.suppress(AudacityError):
                self.c.do("SetPreference", Name=f"{PROBE_PREF}{k}", Value="")
        if len(probes) != n:
            raise BridgeError(f"the selection probe answered for {len(probes)} of {n} selected audio tracks")
        return probes

    # ------------------------------------------------------------------------------------- checks
    def _refusal(self, tr: TrackInfo, p: Probe, all_tracks: list[TrackInfo], envelopes: list[dict[str, Any]],
                 s0: int, s1: int) -> str | None:
        if p.rate != p.project_rate:
            return (f"track '{tr.name}' is at {p.rate} Hz but the project rate is {p.project_rate} Hz, so Audacity "
                    "would resample it on export: set the project rate (bottom left) to the track's rate")
        if tr.mute:
            return f"track '{tr.name}' is muted (muted audio is not exported): unmute it"
        if any(t.solo for t in all_tracks if t.kind == "wave") and not tr.solo:
            return f"another track is soloed, so track '{tr.name}' would not be exported: un-solo it"
        if abs(tr.gain - 1.0) > 1e-6:
            return (f"track '{tr.name}' has a gain of {20 * math.log10(max(tr.gain, 1e-9)):+.2f} dB, which export "
                    "applies: set its gain slider to 0 dB (or apply the gain with Effect > Amplify first)")
        if abs(tr.pan) > 1e-6:
            return f"track '{tr.name}' is panned ({tr.pan:+.2f}), which export applies: set its pan to centre"
        for env in envelopes:
            if int(env.get("track", -1)) == tr.index and env.get("points"):
                e0, e1 = float(env.get("start", 0.0)), float(env.get("end", 0.0))
                if e0 < s1 / p.rate and e1 > s0 / p.rate:
                    return (f"track '{tr.name}' has volume envelope points there, which export applies: remove them "
                            "first")
        if self.replace and p.sample_format != "32":
            return (f"track '{tr.name}' stores {p.sample_format}-bit samples; pasting cloaked audio into it would "
                    "re-quantize and dither it: convert it first (track menu > Format > 32-bit float) or cloak it "
                    "into a new track (without --replace)")
        return None

    def _plan(self, wave: list[TrackInfo], probes: dict[int, Probe], all_tracks: list[TrackInfo],
              ranges: dict[int, tuple[int, int]] | None, outcome: CloakOutcome) -> list[_Job]:
        try:
            envelopes = [e for e in self.c.json("GetInfo: Type=Envelopes Format=JSON") if isinstance(e, dict)]
        except CommandFailed:
            envelopes = []
        jobs: list[_Job] = []
        problems: list[str] = []
        for tr in wave:
            p = probes[tr.index]
            if ranges is not None and tr.index in ranges:
                s0, s1 = ranges[tr.index]
            else:
                s0 = math.floor(p.start * p.rate + 0.5)
                s1 = s0 + p.length
            a0 = math.floor(p.track_start * p.rate + 0.5)
            a1 = math.floor(p.track_end * p.rate + 0.5)
            s0, s1 = max(s0, a0), min(s1, a1)
            if s1 - s0 < MIN_SECONDS * p.rate:
                outcome.skipped.append(f"track '{tr.name}': no audio in the range (or less than {MIN_SECONDS} s)")
                continue
            why = self._refusal(tr, p, all_tracks, envelopes, s0, s1)
            if why:
                problems.append(why)
                continue
            jobs.append(_Job(tr, s0, s1, p.rate))
        if problems:
            raise SelectionError("; ".join(problems))
        if not jobs:
            raise SelectionError("nothing to cloak: " + ("; ".join(outcome.skipped) or "no audio selected"))
        return jobs

    # ------------------------------------------------------------------------------------- export / process
    def _export(self, job: _Job, work: Path, outcome: CloakOutcome) -> np.ndarray:
        import soundfile as sf

        job.src = work / f"export-{job.track.index}.wav"
        self.select(job.t0, job.t1, [job.track.index])
        timeout = self.io_timeout + (job.s1 - job.s0) / job.rate / 5
        self.c.do("Export2", timeout=timeout, Filename=str(job.src), NumChannels=job.track.channels)
        try:
            info = sf.info(str(job.src))
        except Exception as e:  # noqa: BLE001 - soundfile raises several types
            raise BridgeError(f"Audacity's export of track '{job.track.name}' is not readable: {e}") from e
        frames = job.s1 - job.s0
        if info.samplerate != job.rate or info.channels != job.track.channels or info.frames != frames:
            raise BridgeError(f"Audacity exported {info.frames} frames x {info.channels} ch at {info.samplerate} Hz "
                              f"for track '{job.track.name}', expected {frames} x {job.track.channels} at {job.rate}")
        if info.subtype not in ("FLOAT", "DOUBLE"):
            msg = (f"Audacity exported track '{job.track.name}' as {info.subtype_info}, not 32-bit float, although "
                   "the WAV encoding preference was set to float")
            if self.replace:
                raise BridgeError(msg + "; refusing to replace audio with a re-quantized copy")
            outcome.warnings.append(msg + "; the cloaked track is based on that quantized copy")
        audio, _ = sf.read(str(job.src), dtype="float32", always_2d=job.track.channels > 1)
        return audio

    def _cloak(self, job: _Job, audio: np.ndarray, work: Path) -> None:
        import soundfile as sf

        t = time.monotonic()
        out = np.asarray(self.process(audio, job.rate))
        job.seconds = time.monotonic() - t
        if out.shape != audio.shape:
            raise BridgeError(f"the cloaking step returned shape {out.shape} for input {audio.shape}")
        if not np.all(np.isfinite(out)):
            raise BridgeError("the cloaking step returned NaN or infinite samples")
        y = fit_to_budget(out, audio, self.epsilon)
        diff = y.astype(np.float64) - audio.astype(np.float64)
        job.linf = float(np.max(np.abs(diff))) if diff.size else 0.0
        noise = float(np.sum(diff**2))
        job.snr_db = 10 * math.log10(max(float(np.sum(audio.astype(np.float64) ** 2)), 1e-20) / max(noise, 1e-20))
        folder = work / f"out-{job.track.index}"
        folder.mkdir()
        job.out = folder / f"{_file_stem(job.track.name + self.suffix)}.wav"
        sf.write(str(job.out), y, job.rate, subtype="FLOAT", format="WAV")

    # ------------------------------------------------------------------------------------- placing
    def _import_to_clipboard(self, jobs: list[_Job], n: int, position: bool) -> None:
        """Import the jobs' files as tracks n.., optionally move each clip to its range start, copy them all from
        0 s to the clipboard, and undo the imports again (checked)."""
        imported: list[int] = []
        names = [j.out.stem for j in jobs if j.out is not None]
        try:
            for j in jobs:
                self.c.do("Import2", timeout=self.io_timeout, Filename=str(j.out))
                tracks = self.tracks()
                if len(tracks) != n + len(imported) + 1:
                    extra = list(range(n + len(imported), len(tracks)))
                    imported.extend(extra)
                    raise BridgeError(f"importing the cloaked audio added {len(extra)} tracks instead of 1")
                new = tracks[-1]
                imported.append(new.index)
                if new.kind != "wave" or new.channels != j.track.channels:
                    raise BridgeError(f"importing the cloaked audio gave a {new.kind} track with {new.channels} "
                                      f"channels, expected {j.track.channels}")
            end = 0.0
            if position:
                clips = [c for c in self.c.clips() if isinstance(c, dict)]
                for idx, j in zip(imported, jobs, strict=True):
                    mine = [k for k, c in enumerate(clips) if int(c.get("track", -1)) == idx]
                    if len(mine) != 1:
                        raise BridgeError(f"the imported track has {len(mine)} clips, expected 1")
                    self.c.do("SetClip", Clip=mine[0], Start=j.t0)
                clips = [c for c in self.c.clips() if isinstance(c, dict)]
                for idx, j in zip(imported, jobs, strict=True):
                    c = next(c for c in clips if int(c.get("track", -1)) == idx)
                    tol = max(1.0 / j.rate, 1e-5 * j.t1)
                    if abs(float(c["start"]) - j.t0) > tol or abs(float(c["end"]) - j.t1) > tol:
                        raise BridgeError(f"the cloaked clip did not land at {_t(j.t0)}-{_t(j.t1)} s: {c}")
                end = max(j.t1 for j in jobs)
            else:
                end = (jobs[0].s1 - jobs[0].s0) / jobs[0].rate
            self.c.do("Select", Start=0, End=end, Track=imported[0], TrackCount=len(imported), Mode="Set")
            self.c.do("Copy")
        except BaseException:
            self._rollback_imports(imported, names, n)
            raise
        for k in range(len(imported)):
            self._undo_expecting(n + len(imported) - k - 1, "temporary import")

    def _paste_new_tracks(self, jobs: list[_Job]) -> dict[int, str]:
        before = self.tracks()
        n = len(before)
        self._import_to_clipboard(jobs, n, position=True)
        if self.before_paste:
            self.before_paste()
        self.c.do("SelectNone")
        self.c.do("Paste")
        after = self.tracks()
        names: dict[int, str] = {}
        problem = None
        if len(after) != n + len(jobs):
            problem = f"{len(after)} tracks instead of {n + len(jobs)}"
        else:
            clips = [c for c in self.c.clips() if isinstance(c, dict)]
            for j, tr in zip(jobs, after[n:], strict=True):
                mine = [c for c in clips if int(c.get("track", -1)) == tr.index]
                tol = max(1.0 / j.rate, 1e-5 * j.t1)
                if len(mine) != 1 or abs(float(mine[0]["start"]) - j.t0) > tol or \
                        abs(float(mine[0]["end"]) - j.t1) > tol:
                    problem = f"track '{tr.name}' holds {mine}, expected one clip at {_t(j.t0)}-{_t(j.t1)} s"
                    break
                names[j.track.index] = tr.name
        if problem:
            self._undo_expecting(n, "paste")
            raise BridgeError(f"pasting the cloaked audio went wrong ({problem}); it was undone")
        for j, tr in zip(jobs, after[n:], strict=True):  # only when the file name could not carry the name
            wanted = f"{j.track.name}{self.suffix}".replace('"', "'")
            if tr.name != wanted:
                self.c.do("SetTrack", Track=tr.index, Name=wanted)
                names[j.track.index] = wanted
        return names

    def _replace_group(self, jobs: list[_Job]) -> None:
        before = self.tracks()
        n = len(before)
        self._import_to_clipboard(jobs, n, position=False)
        if self.before_paste:
            self.before_paste()
        self.select(jobs[0].t0, jobs[0].t1, [j.track.index for j in jobs])
        self.c.do("Paste")
        after = self.tracks()
        tol = max(2.0 / jobs[0].rate, 1e-5)
        bad = [f"'{b.name}' now ends at {_t(a.end)} s instead of {_t(b.end)} s" for b, a in zip(before, after,
               strict=False) if b.kind == "wave" and abs(a.end - b.end) > max(tol, 1e-5 * b.end)]
        if len(after) != n or bad:
            self._undo_expecting(n, "paste")
            raise BridgeError("pasting the cloaked audio changed the project's layout ("
                              + ("; ".join(bad) or f"{len(after)} tracks instead of {n}") + "); it was undone")

    # ------------------------------------------------------------------------------------- workflows
    def cloak_selection(self) -> CloakOutcome:
        """Cloak the current selection (time range + selected wave tracks)."""
        tracks = self.tracks()
        if not tracks:
            raise SelectionError("the project has no tracks: import or record audio, select a range, try again")
        wave = [t for t in tracks if t.kind == "wave" and t.selected]
        if not wave:
            raise SelectionError("no audio track is selected: select a range on the track(s) to cloak")
        selected_any = [t.index for t in tracks if t.selected]
        self._seen_selection: tuple[float, float] | None = None
        restore: tuple[float, float] | None = None
        try:
            probes = self._guard_and_probe(tracks, wave)
            first = probes[wave[0].index]
            restore = (first.start, first.start + first.length / first.rate)
            return self._run(wave, probes, tracks, None)
        finally:  # the guard's Undo restored the selection of the previous undo state: put the user's back
            restore = restore or self._seen_selection
            if restore is not None:
                with contextlib.suppress(AudacityError):
                    self.select(restore[0], restore[1], selected_any)

    def cloak_range(self, start: float, end: float, track_indices: Sequence[int] | None = None) -> CloakOutcome:
        """Cloak [start, end] seconds on the given wave tracks (None: every wave track with audio there)."""
        if end - start < 1e-3:
            raise SelectionError(f"the range {_t(start)}-{_t(end)} s is empty")
        tracks = self.tracks()
        if track_indices is None:  # every audio track with audio there, except earlier results
            wave = [t for t in tracks if t.kind == "wave" and t.end > start and t.start < end
                    and not (self.suffix and t.name.endswith(self.suffix))]
        else:
            bad = [i for i in track_indices if i < 0 or i >= len(tracks) or tracks[i].kind != "wave"]
            if bad:
                raise SelectionError(f"track(s) {bad} are not audio tracks (tracks moved or removed?)")
            wave = [tracks[i] for i in sorted(set(track_indices))]
        if not wave:
            raise SelectionError(f"no audio track has audio in {_t(start)}-{_t(end)} s")
        self.select(start, end, [t.index for t in wave])
        try:
            probes = self.probe(wave)
            ranges = {t.index: (math.floor(start * probes[t.index].rate + 0.5),
                                math.floor(end * probes[t.index].rate + 0.5)) for t in wave}
            return self._run(wave, probes, tracks, ranges)
        finally:
            with contextlib.suppress(AudacityError):
                self.select(start, end, [t.index for t in wave])

    def _run(self, wave: list[TrackInfo], probes: dict[int, Probe], tracks: list[TrackInfo],
             ranges: dict[int, tuple[int, int]] | None) -> CloakOutcome:
        outcome = CloakOutcome("replace" if self.replace else "new-track")
        jobs = self._plan(wave, probes, tracks, ranges, outcome)
        if self.workdir is not None:
            os.makedirs(self.workdir, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="voicecloak-audacity-", dir=self.workdir))
        old_pref: str | None = None
        pref_set = False
        try:
            reply = self.c.raw(format_command("GetPreference", Name=WAV_FLOAT_PREF))
            old_pref = reply.output.strip() if reply.ok else None
            if old_pref != SF_FORMAT_FLOAT:
                self.c.do("SetPreference", Name=WAV_FLOAT_PREF, Value=SF_FORMAT_FLOAT)
                pref_set = True
            # 1) export and cloak everything before touching the project
            for j in jobs:
                self._check_cancel()
                self.log(f"exporting '{j.track.name}' {_t(j.t0)}-{_t(j.t1)} s ({j.s1 - j.s0} samples at {j.rate} Hz)")
                audio = self._export(j, work, outcome)
                self._check_cancel()
                self.log(f"cloaking '{j.track.name}' ({(j.s1 - j.s0) / j.rate:.2f} s)")
                self._cloak(j, audio, work)
            self._check_cancel()
            # 2) put it back, as one undo step
            new_names: dict[int, str] = {}
            if self.replace:
                groups: dict[tuple[int, int, int], list[_Job]] = {}
                for j in jobs:
                    groups.setdefault((j.s0, j.s1, j.rate), []).append(j)
                for group in groups.values():
                    self.log(f"replacing {_t(group[0].t0)}-{_t(group[0].t1)} s on "
                             + ", ".join(f"'{j.track.name}'" for j in group))
                    self._replace_group(group)
            else:
                new_names = self._paste_new_tracks(jobs)
                for j in jobs:
                    self.log(f"added track '{new_names[j.track.index]}' at {_t(j.t0)}-{_t(j.t1)} s")
            for j in jobs:
                outcome.tracks.append(TrackResult(
                    track=j.track.name, track_index=j.track.index, start=j.t0, end=j.t1, start_sample=j.s0,
                    end_sample=j.s1, sample_rate=j.rate, channels=j.track.channels, linf=j.linf, snr_db=j.snr_db,
                    seconds=j.seconds, new_track=new_names.get(j.track.index)))
            return outcome
        except AudacityError as e:
            if isinstance(e, BridgeError):
                raise
            raise BridgeError(f"{e} (the project was left as it was)") from e
        finally:
            if pref_set:
                with contextlib.suppress(AudacityError):
                    self.c.do("SetPreference", Name=WAV_FLOAT_PREF, Value=old_pref if old_pref is not None else "0")
            shutil.rmtree(work, ignore_errors=True)
