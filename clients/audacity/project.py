"""The open Audacity project as the bridge reads and steers it through a connected PipeClient: tracks, labels,
selection, checked Undo, and the exact selection (``macro.PROBE_NYQUIST``).

GetInfo reports times with ~6 significant digits, so the exact selection start, its length in samples and, per
selected wave track, the sample rate, the project rate, the track's extent and sample format come from a Nyquist
probe that hands them over through Audacity preferences: it does not modify the project. A Nyquist effect on an
empty selection opens a modal dialog that blocks the pipe, so one-shot mode first makes sure the selection is not
empty: it adds a label at the selection (``AddLabel``, which never opens a dialog), reads it, and undoes it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .commands import format_command
from .errors import AudacityError, BridgeError, CommandFailed, SelectionError
from .macro import PROBE_NYQUIST, PROBE_PREF, nyquist_command
from .pipe import PipeClient
from .selection import Probe, TrackInfo

__all__ = ["Project"]


class Project:
    """Reads and small checked changes; ``seen_selection`` is the (start, end) the last guard read, if any."""

    def __init__(self, client: PipeClient) -> None:
        self.c = client
        self.seen_selection: tuple[float, float] | None = None

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

    def envelopes(self) -> list[dict[str, Any]]:
        """Volume envelopes (empty where this Audacity cannot list them)."""
        try:
            return [e for e in self.c.json("GetInfo: Type=Envelopes Format=JSON") if isinstance(e, dict)]
        except CommandFailed:
            return []

    def select(self, t0: float, t1: float, tracks: Sequence[int]) -> None:
        """Select [t0, t1] on exactly these tracks."""
        if not tracks:
            self.c.do("SelectNone")
            self.c.do("SelectTime", Start=t0, End=t1)
            return
        self.c.do("Select", Start=t0, End=t1, Track=tracks[0], TrackCount=1, Mode="Set")
        for i in tracks[1:]:
            self.c.do("SelectTracks", Track=i, TrackCount=1, Mode="Add")

    def undo_expecting(self, n_tracks: int, what: str) -> None:
        """Undo once and check that the project has `n_tracks` tracks again."""
        self.c.do("Undo")
        now = len(self.c.tracks())
        if now != n_tracks:
            raise BridgeError(f"undoing the {what} left {now} tracks instead of {n_tracks}; check the project "
                              "(View > Undo History)")

    def remove_tracks(self, indices: Sequence[int]) -> None:
        for i in sorted(indices, reverse=True):
            with contextlib.suppress(AudacityError):
                self.c.do("Select", Start=0, End=0, Track=i, TrackCount=1, Mode="Set")
                self.c.do("RemoveTracks")

    def rollback_imports(self, imported: list[int], names: list[str], n: int) -> None:
        """Take back tracks this run imported: Undo their Import2 states (checked one by one), else remove those
        that are still there under their names."""
        left = list(imported)
        with contextlib.suppress(AudacityError):
            while left and len(self.c.tracks()) == n + len(left):
                self.undo_expecting(n + len(left) - 1, "import")
                left.pop()
        if left:
            with contextlib.suppress(AudacityError):
                now = self.tracks()
                self.remove_tracks([i for i in left if i < len(now) and now[i].name in names])

    def guard_and_probe(self, tracks: list[TrackInfo], wave: list[TrackInfo]) -> dict[int, Probe]:
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
            self.seen_selection = (start, end)
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
