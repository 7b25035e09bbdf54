"""What is selected, and whether it can be cloaked as it is: the tracks as GetInfo reports them, the exact selection
the Nyquist probe reports per track, and the plan of sample ranges to cloak (or why a track is refused).

Export mixes: a muted track (or another soloed one), a gain other than 0 dB, a pan other than centre, a volume
envelope, or a track rate other than the project rate would change the exported samples, so such tracks are refused
with a message saying what to change. ``--replace`` also needs a 32-bit float track (pasting into 16/24-bit tracks
re-quantizes and dithers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import as_bool
from .errors import SelectionError

__all__ = ["MIN_SECONDS", "CloakJob", "Probe", "TrackInfo", "plan_jobs", "refusal", "seconds_text"]

MIN_SECONDS = 0.1


def seconds_text(x: float) -> str:
    """Seconds with at most 6 decimals, no trailing zeros (as in messages and logs)."""
    return f"{x:.6f}".rstrip("0").rstrip(".") or "0"


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
class CloakJob:
    """One track's sample range [s0, s1) to cloak, and what happened to it."""

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

    @property
    def span(self) -> str:
        """"<t0>-<t1> s", for messages."""
        return f"{seconds_text(self.t0)}-{seconds_text(self.t1)} s"


def refusal(tr: TrackInfo, p: Probe, all_tracks: list[TrackInfo], envelopes: list[dict[str, Any]], s0: int, s1: int,
            replace: bool) -> str | None:
    """Why this track's range would not round-trip through export (None: it would)."""
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
    if replace and p.sample_format != "32":
        return (f"track '{tr.name}' stores {p.sample_format}-bit samples; pasting cloaked audio into it would "
                "re-quantize and dither it: convert it first (track menu > Format > 32-bit float) or cloak it "
                "into a new track (without --replace)")
    return None


def plan_jobs(wave: list[TrackInfo], probes: dict[int, Probe], all_tracks: list[TrackInfo],
              ranges: dict[int, tuple[int, int]] | None, envelopes: list[dict[str, Any]], replace: bool,
              skipped: list[str]) -> list[CloakJob]:
    """The range of each wave track to cloak: the probed selection (or `ranges`), snapped to samples and clamped to
    the track's audio. Tracks with too little audio there are noted in `skipped`; SelectionError when any track is
    refused (every reason at once) or nothing is left."""
    jobs: list[CloakJob] = []
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
            skipped.append(f"track '{tr.name}': no audio in the range (or less than {MIN_SECONDS} s)")
            continue
        why = refusal(tr, p, all_tracks, envelopes, s0, s1, replace)
        if why:
            problems.append(why)
            continue
        jobs.append(CloakJob(tr, s0, s1, p.rate))
    if problems:
        raise SelectionError("; ".join(problems))
    if not jobs:
        raise SelectionError("nothing to cloak: " + ("; ".join(skipped) or "no audio selected"))
    return jobs
