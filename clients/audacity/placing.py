"""Putting cloaked audio back into the project as one undo step.

``Import2`` each cloaked file (named "<track> (cloaked).wav", so the track gets that name), move its clip to the
range start with ``SetClip`` (sample-exact: ``s0/rate`` with 6 decimals rounds back to sample ``s0``), ``Copy`` the
imported tracks from 0 s, ``Undo`` the imports (the clipboard survives), then ``Paste``: default mode with no track
selected, which makes new tracks ("<name> (cloaked)") holding the clips at their positions; ``--replace`` over the
range on the original tracks. Either way the project history gains exactly one "Paste" entry (per distinct range in
replace mode), and every step is checked: a paste that fails its check is undone, imports are rolled back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import BridgeError
from .project import Project
from .selection import CloakJob, seconds_text

__all__ = ["Placer"]


@dataclass
class Placer:
    """Places jobs' cloaked files (``job.out``). ``before_paste`` runs right before each final Paste."""

    project: Project
    io_timeout: float = 60.0
    suffix: str = " (cloaked)"
    before_paste: Callable[[], None] | None = None

    def import_to_clipboard(self, jobs: list[CloakJob], n: int, position: bool) -> None:
        """Import the jobs' files as tracks n.., optionally move each clip to its range start, copy them all from
        0 s to the clipboard, and undo the imports again (checked)."""
        pr, c = self.project, self.project.c
        imported: list[int] = []
        names = [j.out.stem for j in jobs if j.out is not None]
        try:
            for j in jobs:
                c.do("Import2", timeout=self.io_timeout, Filename=str(j.out))
                tracks = pr.tracks()
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
                clips = [x for x in c.clips() if isinstance(x, dict)]
                for idx, j in zip(imported, jobs, strict=True):
                    mine = [k for k, x in enumerate(clips) if int(x.get("track", -1)) == idx]
                    if len(mine) != 1:
                        raise BridgeError(f"the imported track has {len(mine)} clips, expected 1")
                    c.do("SetClip", Clip=mine[0], Start=j.t0)
                clips = [x for x in c.clips() if isinstance(x, dict)]
                for idx, j in zip(imported, jobs, strict=True):
                    clip = next(x for x in clips if int(x.get("track", -1)) == idx)
                    tol = max(1.0 / j.rate, 1e-5 * j.t1)
                    if abs(float(clip["start"]) - j.t0) > tol or abs(float(clip["end"]) - j.t1) > tol:
                        raise BridgeError(f"the cloaked clip did not land at {j.span}: {clip}")
                end = max(j.t1 for j in jobs)
            else:
                end = (jobs[0].s1 - jobs[0].s0) / jobs[0].rate
            c.do("Select", Start=0, End=end, Track=imported[0], TrackCount=len(imported), Mode="Set")
            c.do("Copy")
        except BaseException:
            pr.rollback_imports(imported, names, n)
            raise
        for k in range(len(imported)):
            pr.undo_expecting(n + len(imported) - k - 1, "temporary import")

    def paste_new_tracks(self, jobs: list[CloakJob]) -> dict[int, str]:
        """New tracks holding the cloaked clips at their ranges; {original track index: new track name}."""
        pr, c = self.project, self.project.c
        before = pr.tracks()
        n = len(before)
        self.import_to_clipboard(jobs, n, position=True)
        if self.before_paste:
            self.before_paste()
        c.do("SelectNone")
        c.do("Paste")
        after = pr.tracks()
        names: dict[int, str] = {}
        problem = None
        if len(after) != n + len(jobs):
            problem = f"{len(after)} tracks instead of {n + len(jobs)}"
        else:
            clips = [x for x in c.clips() if isinstance(x, dict)]
            for j, tr in zip(jobs, after[n:], strict=True):
                mine = [x for x in clips if int(x.get("track", -1)) == tr.index]
                tol = max(1.0 / j.rate, 1e-5 * j.t1)
                if len(mine) != 1 or abs(float(mine[0]["start"]) - j.t0) > tol or \
                        abs(float(mine[0]["end"]) - j.t1) > tol:
                    problem = f"track '{tr.name}' holds {mine}, expected one clip at {j.span}"
                    break
                names[j.track.index] = tr.name
        if problem:
            pr.undo_expecting(n, "paste")
            raise BridgeError(f"pasting the cloaked audio went wrong ({problem}); it was undone")
        for j, tr in zip(jobs, after[n:], strict=True):  # only when the file name could not carry the name
            wanted = f"{j.track.name}{self.suffix}".replace('"', "'")
            if tr.name != wanted:
                c.do("SetTrack", Track=tr.index, Name=wanted)
                names[j.track.index] = wanted
        return names

    def replace_group(self, jobs: list[CloakJob]) -> None:
        """Paste the cloaked audio over one range on the original tracks (jobs sharing s0, s1 and rate)."""
        pr = self.project
        before = pr.tracks()
        n = len(before)
        self.import_to_clipboard(jobs, n, position=False)
        if self.before_paste:
            self.before_paste()
        pr.select(jobs[0].t0, jobs[0].t1, [j.track.index for j in jobs])
        pr.c.do("Paste")
        after = pr.tracks()
        tol = max(2.0 / jobs[0].rate, 1e-5)
        bad = [f"'{b.name}' now ends at {seconds_text(a.end)} s instead of {seconds_text(b.end)} s"
               for b, a in zip(before, after, strict=False)
               if b.kind == "wave" and abs(a.end - b.end) > max(tol, 1e-5 * b.end)]
        if len(after) != n or bad:
            pr.undo_expecting(n, "paste")
            raise BridgeError("pasting the cloaked audio changed the project's layout ("
                              + ("; ".join(bad) or f"{len(after)} tracks instead of {n}") + "); it was undone")
