"""FakeProject: a small model of an Audacity 3.2 project that implements the commands the bridge uses, with the undo
behaviour observed on the real one (SetClip, SetTrack and effects push no undo state; Import2, AddLabel, SetLabel,
Paste and RemoveTracks do). Serve it with audacity_fake_pipe.FakeServer(folder, project).
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from audacity_fake_pipe import SILENT, parse_command

__all__ = ["FTrack", "FakeProject"]


def _g6(x: float) -> float:
    return float(f"{x:.6g}")


def _t6(text: str) -> float:
    """Audacity rounds times given in commands to 6 decimals."""
    return round(float(text), 6)


def _t2s(t: float, rate: int) -> int:
    return int(np.floor(t * rate + 0.5))


@dataclass
class FTrack:
    name: str
    kind: str = "wave"
    rate: int = 44100
    channels: int = 1
    clips: list[list] = field(default_factory=list)  # [start sample, ndarray (frames, channels)]
    labels: list[list] = field(default_factory=list)  # [t0, t1, text]
    selected: bool = False
    gain: float = 1.0
    pan: float = 0.0
    mute: bool = False
    solo: bool = False
    fmt: str = "32"
    envelope: list = field(default_factory=list)

    def s_start(self) -> int:
        return min((c[0] for c in self.clips), default=0)

    def s_end(self) -> int:
        return max((c[0] + len(c[1]) for c in self.clips), default=0)

    def dense(self) -> np.ndarray:
        """Samples from 0 to the end (zeros in gaps)."""
        out = np.zeros((self.s_end(), self.channels), np.float32)
        for s, a in self.clips:
            out[s:s + len(a)] = a
        return out

    def render(self, s0: int, s1: int) -> np.ndarray:
        out = np.zeros((max(0, s1 - s0), self.channels), np.float32)
        for s, a in self.clips:
            lo, hi = max(s, s0), min(s + len(a), s1)
            if hi > lo:
                out[lo - s0:hi - s0] = a[lo - s:hi - s]
        return out


class FakeProject:
    """A small Audacity 3.2 project model behind FakeServer (see the module notes)."""

    def __init__(self, rate: int = 44100) -> None:
        self.rate = rate
        self.tracks: list[FTrack] = []
        self.sel = (0.0, 0.0)
        self.prefs: dict[str, str] = {}
        self.clipboard: list[FTrack] = []
        self.history = [self._snap()]
        self.pos = 0
        self.modal = False
        self.fail_on: dict[str, int] = {}  # command -> fail on its n-th call (0 = always)
        self.calls: dict[str, int] = {}
        self.export_ignores_pref = False
        self.lock = threading.Lock()

    # -- undo model
    def _snap(self):
        return (copy.deepcopy(self.tracks), self.sel)

    def push(self) -> None:
        del self.history[self.pos + 1:]
        self.history.append(self._snap())
        self.pos += 1

    def _restore(self) -> None:
        tracks, self.sel = self.history[self.pos]
        self.tracks = copy.deepcopy(tracks)

    # -- helpers
    def add_wave(self, name: str, audio: np.ndarray, rate: int | None = None, start: int = 0, push: bool = True,
                 **kw) -> FTrack:
        a = audio.reshape(len(audio), -1).astype(np.float32)
        tr = FTrack(name, "wave", rate or self.rate, a.shape[1], [[start, a.copy()]], **kw)
        self.tracks.append(tr)
        if push:
            self.push()
        return tr

    def selected_wave(self) -> list[FTrack]:
        return [t for t in self.tracks if t.kind == "wave" and t.selected]

    def labels_flat(self) -> list[tuple[int, list]]:
        return [(i, lab) for i, t in enumerate(self.tracks) if t.kind == "label" for lab in t.labels]

    def _label_track(self) -> FTrack:
        for t in self.tracks:
            if t.kind == "label" and t.selected:
                return t
        n = sum(t.kind == "label" for t in self.tracks) + 1
        lt = FTrack(f"Labels {n}", "label")
        self.tracks.append(lt)
        return lt

    # -- commands
    def __call__(self, line: str):
        with self.lock:
            if self.modal:
                return SILENT
            name, p = parse_command(line)
            self.calls[name] = self.calls.get(name, 0) + 1
            nth = self.fail_on.get(name)
            if nth is not None and (nth == 0 or nth == self.calls[name]):
                return (f"{name} failed (injected)", False)
            fn = getattr(self, "do_" + name.replace("-", "_"), None)
            if name.startswith("Macro_"):
                fn = self.do_Macro
            if fn is None:
                return (f"Your batch command of {name} was not recognized.", False)
            return fn(p)

    def do_GetInfo(self, p):
        kind = p.get("Type")
        if kind == "Tracks":
            out = []
            for t in self.tracks:
                d = {"name": t.name, "focused": 0, "selected": int(t.selected), "kind": t.kind}
                if t.kind == "wave":
                    d.update(start=_g6(t.s_start() / t.rate), end=_g6(t.s_end() / t.rate), pan=t.pan, gain=t.gain,
                             channels=t.channels, solo=int(t.solo), mute=int(t.mute))
                out.append(d)
        elif kind == "Clips":
            out = [{"track": i, "start": _g6(s / t.rate), "end": _g6((s + len(a)) / t.rate), "color": 0}
                   for i, t in enumerate(self.tracks) if t.kind == "wave"
                   for s, a in sorted(t.clips, key=lambda c: c[0])]
        elif kind == "Labels":
            out = [[i, [[_g6(a), _g6(b), text] for a, b, text in t.labels]] for i, t in enumerate(self.tracks)
                   if t.kind == "label"]
        elif kind == "Envelopes":
            out = [{"track": i, "clip": k, "start": _g6(s / t.rate), "end": _g6((s + len(a)) / t.rate),
                    "points": t.envelope} for i, t in enumerate(self.tracks) if t.kind == "wave"
                   for k, (s, a) in enumerate(t.clips)]
        else:
            self.modal = True  # the real one opens an error dialog for a bad Type
            return SILENT
        return "\n" + json.dumps(out)

    def do_Select(self, p):
        self.sel = (_t6(p.get("Start", "0")), _t6(p.get("End", "0")))
        return self.do_SelectTracks(p)

    def do_SelectTime(self, p):
        self.sel = (_t6(p.get("Start", "0")), _t6(p.get("End", "0")))
        return ""

    def do_SelectTracks(self, p):
        first, count = int(p.get("Track", 0)), int(p.get("TrackCount", 1))
        mode = p.get("Mode", "Set")
        for i, t in enumerate(self.tracks):
            inside = first <= i < first + count
            if mode == "Set":
                t.selected = inside
            elif mode == "Add" and inside:
                t.selected = True
            elif mode == "Remove" and inside:
                t.selected = False
        return ""

    def do_SelectNone(self, p):
        for t in self.tracks:
            t.selected = False
        return ""

    def do_SelectAll(self, p):
        for t in self.tracks:
            t.selected = True
        self.sel = (0.0, max((t.s_end() / t.rate for t in self.tracks if t.kind == "wave"), default=0.0))
        return ""

    def do_AddLabel(self, p):
        self._label_track().labels.append([self.sel[0], self.sel[1], ""])
        self.push()
        return ""

    def do_SetLabel(self, p):
        i = int(p["Label"])
        flat = self.labels_flat()
        if i >= len(flat):
            return ("Label index out of range", False)
        flat[i][1][2] = p.get("Text", flat[i][1][2])
        self.push()
        return ""

    def _mark(self) -> None:
        wave = self.selected_wave()
        ids = ",".join(str(i) for i, t in enumerate(self.tracks) if t.kind == "wave" and t.selected)
        t0, t1 = self.sel
        r = wave[0].rate
        end = t0 + (_t2s(t1, r) - _t2s(t0, r)) / r
        self._label_track().labels.append([t0, end, f"cloak:pending tracks={ids} start={t0:.9f} end={end:.9f}"])

    def do_NyquistPrompt(self, p):
        code = p.get("Command", "")
        wave = self.selected_wave()
        if not wave or self.sel[1] <= self.sel[0]:
            self.modal = True  # "Nyquist Prompt requires one or more tracks to be selected."
            return SILENT
        if "SetPreference: Name=/VoiceCloak/Probe" in code:
            t0, t1 = self.sel
            for k, t in enumerate(wave, 1):
                n = _t2s(t1, t.rate) - _t2s(t0, t.rate)
                self.prefs[f"/VoiceCloak/Probe{k}"] = (
                    f"{t0:.9f} {n} {float(t.rate):.9f} {float(self.rate):.9f} {t.s_start() / t.rate:.9f} "
                    f"{t.s_end() / t.rate:.9f} {float(t.fmt):.9f}")
        elif "cloak:pending" in code:
            self._mark()
        return ""

    def do_Macro(self, p):
        if not self.selected_wave() or self.sel[1] <= self.sel[0]:
            self.modal = True
            return SILENT
        self._mark()
        self.push()
        return ""

    def do_GetPreference(self, p):
        if p["Name"] not in self.prefs:
            return ("", False)
        return self.prefs[p["Name"]]

    def do_SetPreference(self, p):
        self.prefs[p["Name"]] = p.get("Value", "")
        return ""

    def do_Export2(self, p):
        wave = [t for t in self.selected_wave() if not t.mute]
        if not wave:
            self.modal = True  # "All selected audio is muted."
            return SILENT
        s0 = _t2s(self.sel[0], self.rate)
        s1 = min(_t2s(self.sel[1], self.rate), max(t.s_end() for t in wave))
        ch = int(p.get("NumChannels", 1))
        mix = np.zeros((max(0, s1 - s0), ch), np.float32)
        for t in wave:
            a = t.render(s0, s1) * np.float32(t.gain)
            mix += a if a.shape[1] == ch else np.repeat(a.mean(1, keepdims=True), ch, 1)
        floaty = self.prefs.get("/FileFormats/ExportFormat_SF1_Type/WAV_10000") == "6" and \
            not self.export_ignores_pref
        sf.write(p["Filename"], mix, self.rate, subtype="FLOAT" if floaty else "PCM_16")
        return f"Exported to WAV format: {p['Filename']}"

    def do_Import2(self, p):
        path = Path(p["Filename"])
        if not path.is_file():
            return (f"Could not open file: {path}", False)
        info = sf.info(str(path))
        a, rate = sf.read(str(path), dtype="float32", always_2d=True)
        self.tracks.append(FTrack(path.stem, "wave", rate, a.shape[1], [[0, a]],
                                  fmt="32" if info.subtype == "FLOAT" else "16"))
        self.push()
        return ""

    def do_SetClip(self, p):
        clips = [c for t in self.tracks if t.kind == "wave" for c in sorted(t.clips, key=lambda c: c[0])]
        k = int(p["Clip"])
        if k >= len(clips):
            return ("Clip index out of range", False)
        owner = next(t for t in self.tracks if any(c is clips[k] for c in t.clips))
        clips[k][0] = _t2s(_t6(p["Start"]), owner.rate)
        return ""

    def do_SetTrack(self, p):
        t = self.tracks[int(p["Track"])]
        if "Name" in p:
            t.name = p["Name"]
        return ""

    def do_Copy(self, p):
        self.clipboard = []
        for t in self.selected_wave():
            s0, s1 = _t2s(self.sel[0], t.rate), _t2s(self.sel[1], t.rate)
            c = FTrack(t.name, "wave", t.rate, t.channels, [], fmt=t.fmt)
            for s, a in t.clips:
                lo, hi = max(s, s0), min(s + len(a), s1)
                if hi > lo:
                    c.clips.append([lo - s0, a[lo - s:hi - s].copy()])
            self.clipboard.append(c)
        return ""

    def do_Paste(self, p):
        if not self.clipboard:
            return ("Nothing to paste", False)
        targets = self.selected_wave()
        if not targets:
            for c in self.clipboard:
                nt = copy.deepcopy(c)
                nt.selected = True
                self.tracks.append(nt)
            self.push()
            return ""
        for t, c in zip(targets, self.clipboard, strict=False):
            s0, s1 = _t2s(self.sel[0], t.rate), _t2s(self.sel[1], t.rate)
            d = t.dense()
            ins = c.render(0, c.s_end())
            start = t.s_start()
            new = np.concatenate([d[:s0], ins, d[s1:]])
            t.clips = [[start, new[start:]]]
        self.push()
        return ""

    def do_Undo(self, p):
        if self.pos > 0:
            self.pos -= 1
            self._restore()
        return ""

    def do_Redo(self, p):
        if self.pos + 1 < len(self.history):
            self.pos += 1
            self._restore()
        return ""

    def do_RemoveTracks(self, p):
        self.tracks = [t for t in self.tracks if not t.selected]
        self.push()
        return ""
