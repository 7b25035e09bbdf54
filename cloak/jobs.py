"""What a protection job hands back and takes in: its cancel token, progress reports and result.

The engine (`cloak.protect`), the attacker's pipeline (`cloak.clone`), evaluation and the server all speak these
types; they live here, below all of them, so that none has to import another to use them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Cancelled(RuntimeError):
    """The job was cancelled through its cancel token."""


class CancelToken:
    """Thread-safe cancel flag, checked once per PGD iteration."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class Progress:
    window: int
    windows: int
    iteration: int
    iterations: int
    losses: dict[str, float]
    elapsed_s: float
    eta_s: float

    @property
    def fraction(self) -> float:
        done = self.window * self.iterations + self.iteration
        return done / max(1, self.windows * self.iterations)


@dataclass
class ProtectResult:
    audio: np.ndarray
    sample_rate: int
    metrics: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
