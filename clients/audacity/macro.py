"""The "Cloak selection" Audacity macro and the label texts it shares with `cloak audacity watch`.

Audacity macros cannot start programs, so the macro only *marks* the selection: it runs a one-line Nyquist
program (Nyquist Prompt, built into Audacity 3.x) that adds a region label over the selection whose text starts with
``cloak:pending`` and records, precisely, what the selection was:

    cloak:pending tracks=0,2 start=1.234568000 end=3.500000000

``tracks`` are the indices (as in ``GetInfo: Type=Tracks``) of the wave tracks selected when the macro ran,
``start``/``end`` the selection in seconds with 9 decimals (label positions reported by GetInfo carry only ~6
significant digits). `cloak audacity watch` picks such labels up, sets them to ``cloak:working``, cloaks the range,
and sets them to ``cloak:done`` or ``cloak:failed: <reason>``. A label typed by hand with just ``cloak:pending`` works
too: its own start/end are used, on every wave track with audio there.

A similar Nyquist program (``PROBE_NYQUIST``) reads the exact selection, per-track sample rates, extents and sample
formats for the bridge; it hands them over through Audacity preferences (``/VoiceCloak/Probe<k>``, read back with
``GetPreference``), so that it does not modify the project at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DONE",
    "FAILED",
    "MACRO_FILENAME",
    "MACRO_NAME",
    "MACRO_TEXT",
    "MARK_NYQUIST",
    "PENDING",
    "PROBE_NYQUIST",
    "PROBE_PREF",
    "WORKING",
    "Mark",
    "failed_text",
    "nyquist_command",
    "parse_mark",
]

MACRO_NAME = "Cloak selection"
MACRO_FILENAME = f"{MACRO_NAME}.txt"
PENDING = "cloak:pending"
WORKING = "cloak:working"
DONE = "cloak:done"
FAILED = "cloak:failed"

# Nyquist helpers, written on one line each (a macro line and a pipe command are one line).
_SELECTED_WAVE_IDS = (
    "(let ((i 0) (ids \"\")) (dolist (tr (aud-get-info \"Tracks\")) "
    "(let ((kind (format nil \"~a\" (cadr (assoc 'kind tr)))) (sel (format nil \"~a\" (cadr (assoc 'selected tr))))) "
    "(if (and (string= kind \"wave\") (or (string= sel \"1\") (string= sel \"T\") (string= sel \"true\"))) "
    "(setf ids (if (string= ids \"\") (format nil \"~a\" i) (format nil \"~a,~a\" ids i))))) "
    "(setf i (1+ i))) ids)")

# Runs once per selected wave track; only the first one adds the region label (returning "" adds nothing).
MARK_NYQUIST = (
    "(setf *float-format* \"%.9f\") "
    "(if (= (get '*track* 'index) 1) "
    f"(list (list 0 (get-duration 1) (format nil \"{PENDING} tracks=~a start=~a end=~a\" {_SELECTED_WAVE_IDS} "
    "(get '*selection* 'start) (+ (get '*selection* 'start) (/ len *sound-srate*))))) \"\")")

# Writes, for each selected wave track k (1-based among the selected wave tracks), the preference
# /VoiceCloak/Probe<k> = "<selection start> <selection length in this track's samples> <track rate> <project rate>
# <track start> <track end> <sample format>" and returns "" (no label, no message): the project is not modified.
PROBE_PREF = "/VoiceCloak/Probe"
PROBE_NYQUIST = (
    "(setf *float-format* \"%.9f\") "
    f"(aud-do (format nil \"SetPreference: Name={PROBE_PREF}~a Value=\\\"~a ~a ~a ~a ~a ~a ~a\\\"\" "
    "(get '*track* 'index) (get '*selection* 'start) (truncate len) *sound-srate* (get '*project* 'rate) "
    "(get '*track* 'start-time) (get '*track* 'end-time) (get '*track* 'format))) \"\"")


def _escape(code: str) -> str:
    return code.replace("\\", "\\\\").replace('"', '\\"')


def nyquist_command(code: str, sep: str = ": ") -> str:
    """A NyquistPrompt command line (pipe: sep ': '; macro file: sep ':')."""
    return f'NyquistPrompt{sep}Command="{_escape(code)}" Version="4"'


MACRO_TEXT = nyquist_command(MARK_NYQUIST, sep=":") + "\n"


def failed_text(reason: str, limit: int = 160) -> str:
    """``cloak:failed: <reason>`` on one line, without double quotes (pipe syntax), shortened."""
    clean = " ".join(reason.replace('"', "'").split())
    if len(clean) > limit:
        clean = clean[: limit - 3] + "..."
    return f"{FAILED}: {clean}"


@dataclass(frozen=True)
class Mark:
    """What a pending label asks for."""

    tracks: tuple[int, ...] | None  # None: every wave track with audio in the range
    start: float | None  # precise times from the label text, None: use the label's own position
    end: float | None


_MARK_RE = re.compile(r"^\s*cloak:pending\b(?P<rest>.*)$", re.S)


def parse_mark(text: str) -> Mark | None:
    """The Mark of a pending label text, None if the text is not ``cloak:pending...``."""
    m = _MARK_RE.match(text)
    if not m:
        return None
    fields = dict(re.findall(r"(\w+)=(\S+)", m.group("rest")))
    tracks: tuple[int, ...] | None = None
    if fields.get("tracks"):
        try:
            tracks = tuple(int(t) for t in fields["tracks"].split(",") if t != "")
        except ValueError:
            tracks = None
    try:
        start = float(fields["start"]) if "start" in fields else None
        end = float(fields["end"]) if "end" in fields else None
    except ValueError:
        start = end = None
    if start is None or end is None:
        start = end = None
    return Mark(tracks or None, start, end)
