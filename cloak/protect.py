"""The PGD engine: VoiceCloak's l-infinity attack on DiffVC's reference path.

This module: the PGD step, the resumable job that walks a clip's windows, and `protect`. One window's set-up and
the objective (the loss terms at a perturbation) are in cloak.attack.

How formats are treated
  * Channels: one perturbation is optimised on the mono mix (what a cloning attacker loads) and added to
    every channel, so the stereo image is untouched and the bound holds on each channel.
  * Rates: delta is optimised at 22.05 kHz (DiffVC's rate; the GE2E path resamples it to 16 kHz inside the
    graph) and resampled to the input's rate, then clipped to [-eps, eps]: the budget holds on the delivered
    waveform. Inputs below 22.05 kHz see delta band-limited through the same round trip during optimisation.
  * Level: output = clip(input + delta, -1, 1); nothing else changes (rate, channels, length, other samples).
  * Audibility: with `shaping="masking"` (the default) each step stays under a bound derived from the clean
    window's spectrum and level (cloak.perceptual), then the epsilon box; `shaping="none"` is the paper's
    plain sign step in the box.
  * Long clips: windows of `window_seconds` with `overlap_seconds` overlap are optimised one after another
    and their deltas cross-faded linearly (a convex combination, so the bound still holds); memory is bounded
    by the window, not the clip.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from . import eot
from .attack import Front, WindowAttack, front, identity_terms, objective, row_terms, unet_score, voice_applicable
from .audio import fit_to_budget, validate_samples
from .bundle import BundleError, Models
from .config import ProtectConfig
from .early_stop import AttackerCheck, unavailable_reason
from .features import DIFFVC_HOP, DIFFVC_RATE, resample, resampled_length
from .jobs import Cancelled, CancelToken, Progress, ProgressFn, ProtectResult
from .perceptual import project_spectral, shaped_step

# The engine's API. objective, unet_score and voice_applicable are cloak.attack's; server/ and bench/ import them
# from here, the engine's front door.
__all__ = ["ENGINE_VERSION", "ProtectionJob", "WindowAttack", "crossfade_weights", "micro_batches", "objective",
           "pgd_step", "plan_size", "protect", "run_jobs", "step_gradient", "step_groups", "terms_at", "unet_score",
           "voice_applicable", "window_plan", "window_samples", "within_budget"]

# Changes whenever the same settings would give a different perturbation (caches of protected audio key on it).
ENGINE_VERSION = ("9: the masking exponent chosen per window for a predicted PESQ-WB of 3.9 (8: every iteration has "
                  "`repeats` draws, CPU steps in micro-batches; 7: lambda_voice 10 by default, fused Mish; "
                  "6: SNR floor of 34 dB per window; 5: L_voice)")


def within_budget(x: torch.Tensor, d: torch.Tensor, eps: float) -> torch.Tensor:
    """d clipped to the epsilon box, x + d kept within full scale, then the box again (a resampled x can
    overshoot 1 by more than eps)."""
    return ((x + d.clamp(-eps, eps)).clamp(-1.0, 1.0) - x).clamp(-eps, eps)


def pgd_step(jobs: list[ProtectionJob]) -> None:
    """One PGD iteration for every job in the group (equal window lengths), sharing one U-Net batch, or, with the
    models' `rows_per_pass`, micro-batches of that many draws (`step_gradient`: same gradient, less memory)."""
    attacks = [j.attack for j in jobs]
    deltas = torch.stack([j.delta for j in jobs])
    idxs = [a.next_indices(j.iteration) for a, j in zip(attacks, jobs, strict=True)]
    draws = [a.eot_draw(j.iteration) for a, j in zip(attacks, jobs, strict=True)]
    grad, losses = step_gradient(attacks, deltas, idxs, draws, jobs[0].models.rows_per_pass)
    with torch.no_grad():
        for j, job in enumerate(jobs):
            cfg = job.cfg
            x = job.attack.x[0]
            if job.attack.shaping_bound is None:  # the paper's sign step in the box
                d = job.delta + cfg.step_size * grad[j].sign()
            else:  # its analogue under the clean audio's masking threshold (cloak.perceptual), then the box
                d = shaped_step(job.delta, grad[j], job.attack.shaping_bound, cfg.step_size / cfg.epsilon)
            job.delta = job.attack.projected(within_budget(x, d, cfg.epsilon))
            job.after_step(losses[j])  # tensors: no host sync per step


def weighted_total(attacks: list[WindowAttack], losses: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The ascent objective: every window's loss terms times its weights, summed over windows."""
    return sum(sum(a.weights[k] * v for k, v in ls.items()) for a, ls in zip(attacks, losses, strict=True))


def step_gradient(attacks: list[WindowAttack], deltas: torch.Tensor, idxs: list[torch.Tensor],
                  draws: list[eot.Draw] | None = None, max_rows: int | None = None,
                  ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The gradient of `weighted_total` at `deltas` (J, N) and the (detached) loss terms of each window.

    `max_rows` bounds the pool draws (U-Net rows) whose autograd graph is held at once, which sets a step's peak
    memory: the row terms (cloak.attack.row_terms) go through in micro-batches of at most that many (every window
    in each, `micro_batches`), each backpropagated to the shared front (cloak.attack.Front, computed once) before
    the next, then the front once. The gradient is the one-batch gradient up to float summation order (and
    kernels' batch-size-dependent rounding). None: one batch."""
    deltas = deltas.detach().requires_grad_(True)
    shared = front(attacks, deltas, draws)
    losses = identity_terms(attacks, shared)
    parts = micro_batches(idxs, max_rows)
    if len(parts) == 1:
        for ls, rows in zip(losses, row_terms(attacks, shared, idxs), strict=True):
            ls.update(rows)
        grad, = torch.autograd.grad(weighted_total(attacks, losses), deltas)
    else:
        grad = _micro_batched_grad(attacks, deltas, shared, losses, idxs, parts)
    return grad, [{k: v.detach() for k, v in ls.items()} for ls in losses]


def micro_batches(idxs: list[torch.Tensor], max_rows: int | None) -> list[list[torch.Tensor]]:
    """Each job's draws split into the fewest micro-batches of at most `max_rows` rows in all (every job in every
    micro-batch, so at most min(draws) of them; sizes as equal as tensor_split makes them)."""
    rows = sum(len(i) for i in idxs)
    count = 1 if max_rows is None else min(math.ceil(rows / max(max_rows, 1)), min(len(i) for i in idxs))
    if count <= 1:
        return [idxs]
    split = [i.tensor_split(count) for i in idxs]
    return [[s[k] for s in split] for k in range(count)]


def terms_at(attacks: list[WindowAttack], deltas: torch.Tensor, idxs: list[torch.Tensor],
             max_rows: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The loss terms of each window at `deltas` (J, N) on draws `idxs`, without gradient, the rows in micro-batches
    of at most `max_rows` (as `step_gradient`, so an evaluation never holds more than a step does)."""
    with torch.no_grad():
        shared = front(attacks, deltas)
        losses = identity_terms(attacks, shared)
        for part in micro_batches(idxs, max_rows):
            _add_rows(losses, row_terms(attacks, shared, part), _shares(part, idxs))
    return losses


def _shares(part: list[torch.Tensor], idxs: list[torch.Tensor]) -> list[float]:
    """Each window's share of its draws in a micro-batch (every row term is a mean over draws)."""
    return [len(p) / len(i) for p, i in zip(part, idxs, strict=True)]


def _add_rows(losses: list[dict[str, torch.Tensor]], rows: list[dict[str, torch.Tensor]], shares: list[float]) -> None:
    for ls, r, w in zip(losses, rows, shares, strict=True):
        for k, v in r.items():
            ls[k] = ls[k] + w * v.detach() if k in ls else w * v.detach()


def _micro_batched_grad(attacks: list[WindowAttack], deltas: torch.Tensor, shared: Front,
                        losses: list[dict[str, torch.Tensor]], idxs: list[torch.Tensor],
                        parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """d objective / d deltas with the row terms in micro-batches `parts` (see `pgd_step`); fills `losses` with
    the row terms' (detached) values over all draws."""
    leaves = shared.detached()
    inputs = leaves.tensors()
    acc: dict[str, torch.Tensor] = {}
    for part in parts:
        rows = row_terms(attacks, leaves, part)
        shares = _shares(part, idxs)
        _add_rows(losses, rows, shares)
        total = weighted_total(attacks, [{k: w * v for k, v in r.items()} for r, w in zip(rows, shares, strict=True)])
        grads = torch.autograd.grad(total, list(inputs.values()), allow_unused=True)
        for k, g in zip(inputs, grads, strict=True):
            if g is not None:
                acc[k] = acc[k] + g if k in acc else g
    ident = [{k: v for k, v in ls.items() if k == "id"} for ls in losses]
    outs, grads_out = [], []
    if any(ident):
        outs.append(weighted_total(attacks, ident))
        grads_out.append(None)
    own = shared.tensors()
    for k, g in acc.items():
        outs.append(own[k])
        grads_out.append(g)
    grad, = torch.autograd.grad(outs, deltas, grad_outputs=grads_out)
    return grad


# ---------------------------------------------------------------------------------------------------------
def window_plan(n: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) windows covering n samples; consecutive windows overlap by `overlap`."""
    if n <= window:
        return [(0, n)]
    hop = window - overlap
    count = math.ceil((n - overlap) / hop)
    starts = [min(i * hop, n - window) for i in range(count)]
    return [(s, s + window) for s in sorted(set(starts))]


def window_samples(cfg: ProtectConfig) -> int:
    """Length of a window at 22.05 kHz: `window_seconds` in whole mel frames, at least 32 frames."""
    return max(DIFFVC_HOP * 32, int(cfg.window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)


def plan_size(frames: int, sample_rate: int, cfg: ProtectConfig) -> tuple[int, int]:
    """(windows, samples per attacked window at 22.05 kHz) of a job on `frames` frames at `sample_rate`, without
    the audio: what a scheduler needs for its time and memory estimates. A clip shorter than a window is one window
    of its own length (at least 16 mel frames: `ProtectionJob.prepare` pads shorter ones)."""
    n22 = resampled_length(frames, sample_rate, DIFFVC_RATE)
    window = window_samples(cfg)
    plan = window_plan(n22, window, int(cfg.overlap_seconds * DIFFVC_RATE))
    return len(plan), window if len(plan) > 1 else max(n22, DIFFVC_HOP * 16)


def crossfade_weights(plan: list[tuple[int, int]], n: int) -> list[torch.Tensor]:
    """Per-window weights that sum to one everywhere: linear ramps where windows overlap."""
    cover = torch.zeros(n, dtype=torch.float64)
    raw = [torch.ones(b - a, dtype=torch.float64) for a, b in plan]
    for i, (a, _) in enumerate(plan):
        if i > 0 and plan[i - 1][1] > a:  # ramp in over the overlap with the previous window
            ov = plan[i - 1][1] - a
            ramp = (torch.arange(ov, dtype=torch.float64) + 0.5) / ov
            raw[i][:ov] = ramp
            raw[i - 1][-ov:] = 1.0 - ramp
    for (a, b), w in zip(plan, raw, strict=True):
        cover[a:b] += w
    if not torch.allclose(cover, torch.ones_like(cover)):
        # the last window, moved back to end at the clip's end, can reach into the window before its neighbour
        # (e.g. 19-20 s clips at the defaults): three windows overlap there and the pairwise ramps do not sum to
        # one, so every window's weight is divided by their sum (all positive, so still a convex combination)
        raw = [w / cover[a:b] for (a, b), w in zip(plan, raw, strict=True)]
    return [w.float() for w in raw]


class ProtectionJob:
    """One protection as a resumable state machine (windows x iterations), so a scheduler can step several
    jobs together: `run_jobs` groups jobs whose current windows have equal shapes into one `pgd_step`."""

    def __init__(self, audio: np.ndarray, sample_rate: int, models: Models, config: ProtectConfig | None = None,
                 progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> None:
        self.cfg = config or ProtectConfig()
        self.models = models
        self.samples = validate_samples(audio, sample_rate, name="input audio")
        voice_applicable(self.cfg.loss_weights, models)  # refuse a voice-only job on a model without a prior, early
        if self.cfg.early_stop:
            reason = unavailable_reason(models.vocoder_dir)
            if reason is not None:
                raise BundleError(reason)
        self.sample_rate = sample_rate
        self.progress = progress
        self.cancel = cancel
        self.t0 = time.perf_counter()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        mono = self.samples if self.samples.ndim == 1 else self.samples.mean(axis=1)
        self.x22 = resample(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), sample_rate, DIFFVC_RATE)
        n22 = self.x22.shape[-1]
        self.plan = window_plan(n22, window_samples(self.cfg), int(self.cfg.overlap_seconds * DIFFVC_RATE))
        self.weights = crossfade_weights(self.plan, n22)
        self.delta22 = torch.zeros(n22)
        self.window = 0
        self.iteration = 0
        self.attack: WindowAttack | None = None
        self.delta = torch.zeros(0)
        self.first_idx = torch.zeros(0, dtype=torch.long)
        self.per_window: list[dict[str, Any]] = []
        self.history: list[dict[str, torch.Tensor]] = []
        self.check: AttackerCheck | None = None  # the window's early-stop check, built at its first check
        self.checks: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        return self.window >= len(self.plan)

    @property
    def total_iterations(self) -> int:
        return len(self.plan) * self.cfg.iterations

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled("protection cancelled")

    def prepare(self) -> WindowAttack:
        """Build (once per window) the current window's attack: the expensive, gradient-free set-up."""
        if self.attack is None:
            a, b = self.plan[self.window]
            seg = self.x22[a:b]
            if seg.shape[-1] < DIFFVC_HOP * 16:  # too short for the U-Net: pad with silence for the attack
                seg = torch.nn.functional.pad(seg, (0, DIFFVC_HOP * 16 - seg.shape[-1]))
            self.attack = WindowAttack(self.models, self.cfg, seg, self.sample_rate, self.gen)
            self.delta = self.start_delta(self.attack)
            self.first_idx = self.attack.next_indices(0)
            self.history = []
            self.iteration = 0
        return self.attack

    def start_delta(self, attack: WindowAttack) -> torch.Tensor:
        """Zero, or with `random_start` a uniform draw in the epsilon box (projected under the shaping bound),
        inside full scale; drawn from the job's generator, so a seed still makes the run reproducible."""
        x = attack.x[0]
        if not self.cfg.random_start:
            return torch.zeros_like(x)
        eps = self.cfg.epsilon
        d = ((torch.rand(x.shape[-1], generator=self.gen) * 2 - 1) * eps).to(x.device)
        if attack.shaping_bound is not None:
            d = project_spectral(d, attack.shaping_bound)
        return attack.projected(within_budget(x, d, eps))

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs whose prepared windows have equal keys can share one U-Net batch. Call `prepare()` first: the key
        is read from the current window's attack, never built here."""
        if self.attack is None:
            raise RuntimeError("batch_key() of a window that is not prepared: call prepare() first")
        return (self.attack.x.shape[-1], self.cfg.source_frames, self.cfg.id_encoders,
                tuple(k for k in ("ctx", "sem") if self.attack.weights[k] > 0))

    def finish_unperturbed(self) -> None:
        """The zero-iteration case: every window is set up and closed without a PGD step, so the result is the
        input unchanged (with the loss figures of the clean windows)."""
        while not self.done:
            self.prepare()
            self.finish_window()

    def after_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Record one iteration's (device) loss values, report progress, close the window when it is done.
        On an asynchronous device progress shows the previous iteration's losses: reading those waits only for
        that step while this one is already queued, so the device never idles waiting for the host."""
        self.history.append(losses)
        self.iteration += 1
        if self.progress is not None:
            lagged = self.models.device.type != "cpu" and len(self.history) > 1
            shown = {k: float(v) for k, v in self.history[-2 if lagged else -1].items()}
            done = self.window * self.cfg.iterations + self.iteration
            elapsed = time.perf_counter() - self.t0
            self.progress(Progress(self.window, len(self.plan), self.iteration, self.cfg.iterations, shown,
                                   elapsed, elapsed / max(done, 1) * (self.total_iterations - done)))
        if self.iteration >= self.cfg.iterations or self._early_stop_met():
            self.finish_window()

    def _early_stop_met(self) -> bool:
        cfg = self.cfg
        if not cfg.early_stop or self.iteration % cfg.early_stop_every:
            return False
        attack = self.prepare()
        if self.check is None:
            self.check = AttackerCheck(self.models, cfg, attack.x, attack.sources[0])
        with torch.no_grad():
            result = self.check(attack.adversarial(self.delta[None]))
        self.checks.append({"iteration": self.iteration, **result})
        return bool(result["met"])

    def finish_window(self) -> None:
        """Close the current window: record its start/end losses, cross-fade its delta in, move on."""
        attack = self.prepare()
        zero = torch.zeros_like(self.delta)
        start, end = terms_at([attack, attack], torch.stack([zero, self.delta]), [self.first_idx] * 2,
                              self.models.rows_per_pass)
        a, b = self.plan[self.window]
        d = self.delta.detach().cpu()
        full = torch.zeros(b - a)
        full[: min(d.shape[-1], b - a)] = d[: b - a]
        self.delta22[a:b] += full * self.weights[self.window]
        self.per_window.append({"losses_start": _floats([start])[0], "losses_end": _floats([end])[0],
                                "history": _floats(self.history), "gender": attack.sex,
                                "opposite_speaker": attack.opposite_name, "iterations": self.iteration,
                                "early_stop_checks": self.checks, "masking_exponent": attack.masking_exponent,
                                "predicted_pesq": attack.predicted_pesq})
        self.attack = None
        self.check = None
        self.checks = []
        self.window += 1

    def result(self) -> ProtectResult:
        if not self.done:
            raise RuntimeError("protection job is not finished")
        cfg, samples = self.cfg, self.samples
        delta = resample(self.delta22, DIFFVC_RATE, self.sample_rate)
        frames = samples.shape[0]
        if delta.shape[-1] < frames:
            delta = torch.nn.functional.pad(delta, (0, frames - delta.shape[-1]))
        delta = delta[:frames].clamp(-cfg.epsilon, cfg.epsilon).numpy().astype(np.float32)
        out = np.clip(samples + (delta if samples.ndim == 1 else delta[:, None]), -1.0, 1.0).astype(np.float32)
        out = fit_to_budget(out, samples, cfg.epsilon)  # float32 rounding must not step past the bound
        diff = out.astype(np.float64) - samples.astype(np.float64)
        signal = float(np.sum(samples.astype(np.float64) ** 2))
        snr = 10 * math.log10(max(signal, 1e-20) / max(float(np.sum(diff**2)), 1e-20))

        def mean_of(key: str) -> dict[str, float]:
            return {k: float(np.mean([w[key][k] for w in self.per_window])) for k in self.per_window[0][key]}

        metrics: dict[str, Any] = {
            "snr_db": snr,
            "linf": float(np.max(np.abs(diff))),
            "losses_start": mean_of("losses_start"),
            "losses_end": mean_of("losses_end"),
            "iterations": cfg.iterations,
            "iterations_run": [w["iterations"] for w in self.per_window],
            "early_stop_checks": [w["early_stop_checks"] for w in self.per_window],
            "precision": self.models.precision,
            "windows": len(self.plan),
            "seconds": time.perf_counter() - self.t0,
            "gender": self.per_window[0]["gender"],
            "opposite_speaker": self.per_window[0]["opposite_speaker"],
            "history": [w["history"] for w in self.per_window],
            "masking_exponents": [w["masking_exponent"] for w in self.per_window],
            "predicted_pesq": [w["predicted_pesq"] for w in self.per_window],
            "model": self.models.diffvc_id,
            "config": cfg.to_dict(),
        }
        return ProtectResult(out, self.sample_rate, metrics)


def _floats(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Loss tensors of many iterations to floats with one device-to-host transfer."""
    if not rows:
        return []
    keys = list(rows[0])
    if not keys:
        return [{} for _ in rows]
    values = torch.stack([torch.stack([r[k].float().reshape(()) for k in keys]) for r in rows]).cpu().tolist()
    return [dict(zip(keys, v, strict=True)) for v in values]


def step_groups(jobs: list[ProtectionJob], max_batch: int) -> list[list[ProtectionJob]]:
    """The U-Net batches of one round: prepared jobs grouped by `batch_key()` (in first-seen order), each group cut
    into batches of at most `max_batch`. Used by `run_jobs` and by the server's scheduler."""
    groups: dict[tuple[Any, ...], list[ProtectionJob]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    return [g[i:i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def run_jobs(jobs: list[ProtectionJob], max_batch: int = 8) -> None:
    """Step every job to completion; jobs whose current windows share a batch key go through one U-Net batch
    (`step_groups`).
    A cancelled job raises Cancelled out of here only when it is the sole job; otherwise it is dropped and
    its token stays set for the caller to see."""
    active = list(jobs)
    while active:
        for job in list(active):
            if job.cancel is not None and job.cancel.cancelled:
                active.remove(job)
                if len(jobs) == 1:
                    job.check_cancel()
        for job in active:
            job.prepare()
        for batch in step_groups(active, max_batch):
            pgd_step(batch)
        active = [j for j in active if not j.done]


def protect(audio: np.ndarray, sample_rate: int, models: Models | None = None, config: ProtectConfig | None = None,
            progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> ProtectResult:
    """Cloak a recording: returns audio of the same shape and rate with |output - input| <= epsilon."""
    if models is None:
        from .bundle import load_models

        models = load_models()
    job = ProtectionJob(audio, sample_rate, models, config, progress, cancel)
    if job.cfg.iterations == 0:  # no PGD step: the input comes back unchanged (run_jobs has no window left to step)
        job.finish_unperturbed()
        zero = job.result()
        zero.metrics["note"] = "iterations=0: no perturbation was computed; the output is the input unchanged"
        return zero
    run_jobs([job])
    return job.result()
