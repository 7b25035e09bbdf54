"""The short speech sample shipped with VoiceCloak: something to try the tool on right after installing.

One LibriSpeech utterance (speaker 3331, F, 5.6 s, 16 kHz mono 16-bit FLAC), CC BY 4.0; the attribution is in
``cloak/data/samples/SOURCES.md`` and :data:`SAMPLE_CREDIT`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_CREDIT", "SAMPLE_NAME", "sample_path"]

SAMPLE_NAME = "librispeech-3331-159605-0003.flac"
SAMPLE_CREDIT = ("LibriSpeech utterance 3331-159605-0003 (speaker 3331), LibriSpeech (c) 2014 by Vassil Panayotov, "
                 "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)")


def sample_path() -> Path:
    """Path of the shipped sample inside the installed package (read it, do not write beside it)."""
    path = Path(__file__).resolve().parent / "data" / "samples" / SAMPLE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the shipped speech sample is missing from this installation: {path}")
    return path
