"""Cancellation inside a PGD iteration, without touching the engine (cloak.protect checks its cancel token only
between iterations, and allowed settings make one iteration last minutes, so drain and disconnect overran their
timeouts).

StepGuard puts PyTorch hooks on the DiffVC U-Net: a forward pre-hook on its blocks (on the U-Net as a whole when
it is torch.compiled: hooks inside a compiled graph would break it) and, during a step, a gradient hook on each
block's output. While the scheduler runs a step or a window's set-up for some jobs, every hook checks whether
all of those jobs are cancelled and, if so, raises StepCancelled, which abandons the step: the jobs' state is
that of before the step (cloak.protect updates a perturbation only after its gradient is complete), and the
scheduler ends them as cancelled. A step shared with a job that is not cancelled runs on."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StepCancelled(RuntimeError):
    """Every job of the running step was cancelled."""


class StepGuard:
    def __init__(self) -> None:
        self._recs: Sequence[Any] = ()
        self._thread: int | None = None
        self.tripped = False
        self._handles: list[Any] = []

    def install(self, models: Any) -> None:
        """Hook the U-Net of `models` (once; several servers may share one Models, each with its own guard)."""
        self.remove()
        est = models.diffvc.decoder.estimator
        if getattr(models, "compiled", False):
            blocks = [est]
        else:
            blocks = [m for m in est.modules() if m is est or any(True for _ in m.parameters(recurse=False))
                      or m.__class__.__name__.endswith(("Block", "Residual"))]
        for m in blocks:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def watching(self, recs: Sequence[Any]) -> Iterator[None]:
        """Within this block, the U-Net work is for `recs` (job records with a .cancel token)."""
        self._recs, self._thread, self.tripped = tuple(recs), threading.get_ident(), False
        try:
            yield
        finally:
            self._recs, self._thread = (), None

    def check(self) -> None:
        recs = self._recs
        if recs and all(r.cancel.cancelled for r in recs):
            self.tripped = True
            raise StepCancelled("every job of this step was cancelled")

    def _mine(self) -> bool:
        return self._thread == threading.get_ident() and bool(self._recs)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if self._mine():
            self.check()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._mine() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._grad)  # backward may run on another thread (CUDA): no thread check there

    def _grad(self, grad: torch.Tensor) -> None:
        self.check()
