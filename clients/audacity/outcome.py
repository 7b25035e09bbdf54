"""What a bridge run reports: per cloaked track range, where it went and how large the perturbation is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CloakOutcome", "TrackResult"]


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
