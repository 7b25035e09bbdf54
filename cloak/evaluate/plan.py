"""Which speakers, utterances and attacker sources an evaluation uses: chosen deterministically from the speaker
directory, so that a stopped run resumes on the same plan."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..corpus import Speaker


@dataclass
class Utterance:
    speaker: Speaker
    path: Path

    @property
    def key(self) -> str:
        return f"{safe_name(self.speaker.name)}/{safe_name(self.path.stem)}"


def select_speakers(speakers: list[Speaker], limit: int | None) -> list[Speaker]:
    """Speakers with at least 2 files (one to protect, one to enroll). With a limit, pairs of the same sex are
    taken in turn from each sex (largest group first; within a group, most files first) so every chosen speaker
    has a same-sex partner for gender-matched sources whenever possible."""
    usable = [s for s in speakers if len(s.files) >= 2]
    if limit is None or limit >= len(usable):
        return usable
    groups: dict[str, list[Speaker]] = {}
    for s in usable:
        groups.setdefault(s.sex or "?", []).append(s)
    order = sorted(groups.values(), key=lambda g: (-len(g), g[0].name))
    for g in order:
        g.sort(key=lambda s: (-len(s.files), s.name))
    chosen: list[Speaker] = []
    while len(chosen) < limit and any(order):
        for g in order:
            take = g[:2] if limit - len(chosen) >= 2 or len(g) < 2 else g[:1]
            take = take[: limit - len(chosen)]
            chosen.extend(take)
            del g[: len(take)]
            if len(chosen) >= limit:
                break
    return sorted(chosen, key=lambda s: s.name)


def safe_name(name: str) -> str:
    """A file-name-safe form of a speaker, file or condition name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def stable_seed(*parts: Any) -> int:
    """A seed from names, the same in every process (unlike hash())."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def duration(path: Path) -> float:
    """Seconds of audio in a file; 0 for a file that cannot be read."""
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - unreadable files are simply not chosen
        return 0.0


def pick_utterances(speaker: Speaker, n: int, min_seconds: float) -> list[Path]:
    """The first n files (sorted) at least min_seconds long, always leaving one file for the enrollment."""
    ok = [f for f in speaker.files if duration(f) >= min_seconds]
    return ok[: max(0, min(n, len(speaker.files) - 1))]


def pick_sources(target: Speaker, utt: Path, pool: list[Speaker], k: int, seed: int) -> tuple[list[Path], bool]:
    """k attacker sources for (target, utt): files of other speakers of the same sex (gender-matched, as the paper),
    distinct speakers first; falls back to any other speaker when no same-sex speaker exists (flagged False)."""
    others = [s for s in pool if s.name != target.name]
    same = [s for s in others if target.sex is not None and s.sex == target.sex]
    matched = bool(same)
    cands = same or others
    if not cands:
        return [], False
    rng = np.random.default_rng(stable_seed(seed, target.name, utt.name))
    order = list(rng.permutation(len(cands)))
    out = []
    for i in range(k):
        spk = cands[order[i % len(cands)]]
        out.append(spk.files[int(rng.integers(len(spk.files)))])
    return out, matched
