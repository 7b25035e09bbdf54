"""Speaker directories: one sub-directory per speaker holding that speaker's utterances.

Speaker sex is read, in this order, from a `speakers.tsv` (folder<TAB>M|F) in the root, or from the
`SOURCES.md` tables/headings of the project's corpora (`| `folder/` | F |` rows or "### `folder/` — ... (M)").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


@dataclass
class Speaker:
    name: str
    sex: str | None  # "M", "F" or None when unknown
    files: list[Path] = field(default_factory=list)


def _sex_table(root: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    tsv = root / "speakers.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            parts = line.strip().split("\t")
            if len(parts) >= 2 and parts[1].upper() in ("M", "F"):
                table[parts[0].strip("/")] = parts[1].upper()
        return table
    src = root / "SOURCES.md"
    if src.is_file():
        text = src.read_text(encoding="utf-8")
        for m in re.finditer(r"^\|\s*`([^`/]+)/?`\s*\|\s*([MF])\s*\|", text, re.M):
            table[m.group(1)] = m.group(2)
        for m in re.finditer(r"^###\s*`([^`/]+)/?`.*\(([MF])\)\s*$", text, re.M):
            table[m.group(1)] = m.group(2)
    return table


def list_speakers(root: str | Path) -> list[Speaker]:
    """All speaker folders under root (sorted), each with its audio files (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"speaker directory not found: {root}")
    sexes = _sex_table(root)
    speakers = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file())
        if files:
            speakers.append(Speaker(d.name, sexes.get(d.name), files))
    if not speakers:
        raise ValueError(f"no speaker sub-directories with audio under {root}")
    return speakers
