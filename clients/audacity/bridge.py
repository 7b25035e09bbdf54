"""The "Cloak selection" workflow: Audacity selection -> 32-bit float WAV -> cloak -> back into the project.

Facts about Audacity 3.2 this relies on (verified against Debian's 3.2.4 under Xvfb, see tests/test_audacity_e2e.py):
SetClip, SetTrack and effects run from the pipe (Nyquist Prompt) change the project *without* pushing an undo
state, while Import2, AddLabel, SetLabel, Paste and RemoveTracks push one; a later Undo reverts such "dangling"
changes too, and a Redo does not bring them back. The workflow leaves none behind, and every Undo it issues undoes
exactly a state it has just pushed itself (each one is checked).

1. **Where exactly** (:mod:`.project`): the selection is checked not to be empty, then a Nyquist probe reports the
   exact selection and, per selected wave track, its rate, extent and sample format without modifying the project.
   The range is snapped to samples and clamped to the track's audio.
2. **Refuse what would not round-trip** (:mod:`.selection`): tracks whose export would alter the samples (mute/solo,
   gain, pan, envelope, a rate other than the project's; for ``--replace`` also 16/24-bit tracks), with a message
   saying what to change.
3. **Export** the range of each track alone with ``Export2`` as WAV, after setting Audacity's WAV encoding preference
   to 32-bit float (restored afterwards); the file is checked (float, rate, channels, frame count).
4. **Cloak** with the injected processor (local models or a server); ``|out - in| <= epsilon`` is then enforced
   exactly. Nothing in the project has been changed up to here.
5. **Place, as one undo step** (:mod:`.placing`): import the cloaked files, copy them, undo the imports, paste as new
   tracks "<name> (cloaked)" (or over the range with ``--replace``): the project history gains exactly one "Paste"
   entry (per distinct range in replace mode), and Edit > Undo takes the whole cloak back.

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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cloak.audio import fit_to_budget

from .commands import format_command
from .errors import AudacityError, BridgeCancelled, BridgeError, SelectionError
from .outcome import CloakOutcome, TrackResult
from .pipe import PipeClient
from .placing import Placer
from .project import Project
from .selection import CloakJob, Probe, TrackInfo, plan_jobs, seconds_text

__all__ = ["Bridge", "Processor"]

Processor = Callable[[np.ndarray, int], np.ndarray]
"""process(audio, sample_rate) -> cloaked audio of the same shape (float32, frames first)."""

WAV_FLOAT_PREF = "/FileFormats/ExportFormat_SF1_Type/WAV_10000"  # SF_FORMAT_WAV's encoding; 6 = SF_FORMAT_FLOAT
SF_FORMAT_FLOAT = "6"


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
        self.project = Project(client)
        self.process = process
        self.epsilon = float(epsilon)
        self.replace = replace
        self.suffix = suffix
        self.workdir = workdir
        self.log = log or (lambda msg: None)
        self.cancelled = cancelled or (lambda: False)
        self.io_timeout = io_timeout
        self.before_paste: Callable[[], None] | None = None

    def labels(self) -> list[tuple[int, float, float, str]]:
        """(label track index, start, end, text) of every label, in SetLabel's global order."""
        return self.project.labels()

    def _check_cancel(self) -> None:
        if self.cancelled():
            raise BridgeCancelled("cancelled")

    # ------------------------------------------------------------------------------------- export / process
    def _export(self, job: CloakJob, work: Path, outcome: CloakOutcome) -> np.ndarray:
        import soundfile as sf

        job.src = work / f"export-{job.track.index}.wav"
        self.project.select(job.t0, job.t1, [job.track.index])
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

    def _cloak(self, job: CloakJob, audio: np.ndarray, work: Path) -> None:
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

    # ------------------------------------------------------------------------------------- workflows
    def cloak_selection(self) -> CloakOutcome:
        """Cloak the current selection (time range + selected wave tracks)."""
        tracks = self.project.tracks()
        if not tracks:
            raise SelectionError("the project has no tracks: import or record audio, select a range, try again")
        wave = [t for t in tracks if t.kind == "wave" and t.selected]
        if not wave:
            raise SelectionError("no audio track is selected: select a range on the track(s) to cloak")
        selected_any = [t.index for t in tracks if t.selected]
        self.project.seen_selection = None
        restore: tuple[float, float] | None = None
        try:
            probes = self.project.guard_and_probe(tracks, wave)
            first = probes[wave[0].index]
            restore = (first.start, first.start + first.length / first.rate)
            return self._run(wave, probes, tracks, None)
        finally:  # the guard's Undo restored the selection of the previous undo state: put the user's back
            restore = restore or self.project.seen_selection
            if restore is not None:
                with contextlib.suppress(AudacityError):
                    self.project.select(restore[0], restore[1], selected_any)

    def cloak_range(self, start: float, end: float, track_indices: Sequence[int] | None = None) -> CloakOutcome:
        """Cloak [start, end] seconds on the given wave tracks (None: every wave track with audio there)."""
        if end - start < 1e-3:
            raise SelectionError(f"the range {seconds_text(start)}-{seconds_text(end)} s is empty")
        tracks = self.project.tracks()
        if track_indices is None:  # every audio track with audio there, except earlier results
            wave = [t for t in tracks if t.kind == "wave" and t.end > start and t.start < end
                    and not (self.suffix and t.name.endswith(self.suffix))]
        else:
            bad = [i for i in track_indices if i < 0 or i >= len(tracks) or tracks[i].kind != "wave"]
            if bad:
                raise SelectionError(f"track(s) {bad} are not audio tracks (tracks moved or removed?)")
            wave = [tracks[i] for i in sorted(set(track_indices))]
        if not wave:
            raise SelectionError(f"no audio track has audio in {seconds_text(start)}-{seconds_text(end)} s")
        self.project.select(start, end, [t.index for t in wave])
        try:
            probes = self.project.probe(wave)
            ranges = {t.index: (math.floor(start * probes[t.index].rate + 0.5),
                                math.floor(end * probes[t.index].rate + 0.5)) for t in wave}
            return self._run(wave, probes, tracks, ranges)
        finally:
            with contextlib.suppress(AudacityError):
                self.project.select(start, end, [t.index for t in wave])

    def _run(self, wave: list[TrackInfo], probes: dict[int, Probe], tracks: list[TrackInfo],
             ranges: dict[int, tuple[int, int]] | None) -> CloakOutcome:
        outcome = CloakOutcome("replace" if self.replace else "new-track")
        jobs = plan_jobs(wave, probes, tracks, ranges, self.project.envelopes(), self.replace, outcome.skipped)
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
                self.log(f"exporting '{j.track.name}' {j.span} ({j.s1 - j.s0} samples at {j.rate} Hz)")
                audio = self._export(j, work, outcome)
                self._check_cancel()
                self.log(f"cloaking '{j.track.name}' ({(j.s1 - j.s0) / j.rate:.2f} s)")
                self._cloak(j, audio, work)
            self._check_cancel()
            # 2) put it back, as one undo step
            new_names: dict[int, str] = {}
            placer = Placer(self.project, self.io_timeout, self.suffix, self.before_paste)
            if self.replace:
                groups: dict[tuple[int, int, int], list[CloakJob]] = {}
                for j in jobs:
                    groups.setdefault((j.s0, j.s1, j.rate), []).append(j)
                for group in groups.values():
                    self.log(f"replacing {group[0].span} on "
                             + ", ".join(f"'{j.track.name}'" for j in group))
                    placer.replace_group(group)
            else:
                new_names = placer.paste_new_tracks(jobs)
                for j in jobs:
                    self.log(f"added track '{new_names[j.track.index]}' at {j.span}")
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
