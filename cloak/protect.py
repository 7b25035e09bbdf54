"""The PGD engine: VoiceCloak's l-infinity attack on DiffVC's reference path.

How formats are treated
  * Channels: one perturbation is optimised on the mono mix (what a cloning attacker loads) and added to
    every channel, so the stereo image is untouched and the bound holds on each channel.
  * Rates: delta is optimised at 22.05 kHz (DiffVC's rate; the GE2E path resamples it to 16 kHz inside the
    graph) and resampled to the input's rate, then clipped to [-eps, eps]: the budget holds on the delivered
    waveform. Inputs below 22.05 kHz see delta band-limited through the same round trip during optimisation.
  * Level: output = clip(input + delta, -1, 1); nothing else changes (rate, channels, length, other samples).
  * Long clips: windows of `window_seconds` with `overlap_seconds` overlap are optimised one after another
    and their deltas cross-faded linearly (a convex combination, so the bound still holds); memory is bounded
    by the window, not the clip.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .audio import validate_samples
from .bundle import Models
from .config import LOSS_NAMES, ProtectConfig
from .features import DIFFVC_HOP, DIFFVC_RATE, GE2E_RATE, diffvc_mel, resample
from .losses import context_log_probs, context_loss, identity_loss, score_loss, semantic_loss, summed_context
from .models.diffvc_decoder import ScoreInternals
from .models.ge2e import volume_gain


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


# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Pool:
    """Per-job fixed draws (t, x_t, surrogate source) and what the clean and noise references give there."""

    t: torch.Tensor  # (P,)
    x_t: torch.Tensor  # (P, 80, S)
    mean: torch.Tensor  # (P, 80, S)
    mask: torch.Tensor  # (P, 1, S)
    logp_ref: torch.Tensor | None = None  # (P, 4, 32, 32)
    feat_clean: dict[str, torch.Tensor] = field(default_factory=dict)
    feat_noise: dict[str, torch.Tensor] = field(default_factory=dict)

    def take(self, idx: torch.Tensor) -> _Pool:
        return _Pool(self.t[idx], self.x_t[idx], self.mean[idx], self.mask[idx],
                     None if self.logp_ref is None else self.logp_ref[idx],
                     {k: v[idx] for k, v in self.feat_clean.items()},
                     {k: v[idx] for k, v in self.feat_noise.items()})


class WindowAttack:
    """Everything one window's PGD needs, precomputed once; `objective` is the batched hot path."""

    def __init__(self, models: Models, cfg: ProtectConfig, x22: torch.Tensor, sample_rate: int,
                 gen: torch.Generator) -> None:
        self.m = models
        self.cfg = cfg
        self.dev = models.device
        self.weights = cfg.loss_weights
        self.band_rate = sample_rate if sample_rate < DIFFVC_RATE else None
        n = x22.shape[-1] // DIFFVC_HOP * DIFFVC_HOP
        self.x = x22[:n].to(self.dev)[None]  # (1, N)
        self.n_frames = n // DIFFVC_HOP
        self.ref_mask = torch.ones(1, 1, self.n_frames, device=self.dev)
        dv = models.diffvc
        with torch.no_grad():
            x16 = resample(self.x, DIFFVC_RATE, GE2E_RATE)
            self.gain = volume_gain(x16)
            self.id_encoders = models.speaker_encoders(cfg.id_encoders)
            self.emb_clean = [e.embed(x16 * self.gain if e is models.ge2e else x16) for e in self.id_encoders]
            sex = cfg.gender[0].upper() if cfg.gender != "auto" else \
                models.bank.classify_sex(models.ge2e, self.emb_clean_ge2e(x16), self.dev)
            self.sex = sex
            opp = models.bank.of_sex("F" if sex == "M" else "M")
            self.opposite = opp[int(torch.randint(len(opp), (1,), generator=gen))]
            self.centroids = [models.bank.centroid(e, self.opposite, self.dev) for e in self.id_encoders]
            # the fixed pool of (t, source, x_t) draws: repeats x t_adv of them, t stratified over the grid
            grid = [1.0 - i / cfg.inference_steps for i in range(cfg.t_adv)]
            pool_size = cfg.repeats * cfg.t_adv
            sources = models.bank.of_sex(sex)
            mels = []
            for _ in range(pool_size):
                spk = sources[int(torch.randint(len(sources), (1,), generator=gen))]
                mels.append(models.bank.source_mel(spk, cfg.source_frames, gen))
            src = torch.stack(mels).to(self.dev)
            mask = torch.ones(pool_size, 1, cfg.source_frames, device=self.dev)
            t = torch.tensor([grid[i % cfg.t_adv] for i in range(pool_size)], device=self.dev)
            z = torch.randn(src.shape, generator=gen).to(self.dev)
            mean = torch.cat([dv.average_voice(s, m) for s, m in zip(src.split(cfg.repeats),
                                                                     mask.split(cfg.repeats), strict=True)])
            x_t = dv.decoder.compute_diffused_mean(src, mask, mean, t) + z * torch.sqrt(dv.decoder.variance(t))
            self.pool = _Pool(t, x_t * mask, mean, mask)
            # clean-reference internals at every pool draw
            ref = self._reference(self.x, x16 * self.gain)
            self.pool.logp_ref, self.pool.feat_clean = self._internals(ref, self.pool)
            # white-noise reference and source (same length and RMS as the clean window), fixed per job
            rms = float(self.x.pow(2).mean().sqrt().clamp_min(1e-4))
            noise = torch.randn(self.x.shape, generator=gen).to(self.dev) * rms
            n16 = resample(noise, DIFFVC_RATE, GE2E_RATE)
            noise_ref = self._reference(noise, n16 * volume_gain(n16))
            nmel = noise_ref[0][..., : cfg.source_frames]
            if nmel.shape[-1] < cfg.source_frames:
                nmel = nmel.repeat(1, 1, math.ceil(cfg.source_frames / nmel.shape[-1]))[..., : cfg.source_frames]
            nmean = dv.average_voice(nmel, mask[:1])
            nx_t = dv.decoder.compute_diffused_mean(nmel, mask[:1], nmean, t) + z * torch.sqrt(dv.decoder.variance(t))
            noise_pool = _Pool(t, nx_t * mask, nmean.expand(pool_size, -1, -1), mask)
            _, self.pool.feat_noise = self._internals(noise_ref, noise_pool)

    def emb_clean_ge2e(self, x16: torch.Tensor) -> torch.Tensor:
        for e, emb in zip(self.id_encoders, self.emb_clean, strict=True):
            if e is self.m.ge2e:
                return emb
        return self.m.ge2e.embed(x16 * self.gain)

    def _reference(self, wave22: torch.Tensor, wave16: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ref mel, mean_ref, d-vector) of a reference waveform."""
        mel = diffvc_mel(wave22)
        mask = torch.ones(1, 1, mel.shape[-1], device=self.dev)
        return mel, self.m.diffvc.average_voice(mel, mask), self.m.ge2e.embed(wave16)

    def _score(self, ref: tuple[torch.Tensor, ...], pool: _Pool) -> tuple[torch.Tensor, ScoreInternals]:
        mel, mean_ref, c = ref
        b = pool.t.shape[0]
        mask = torch.ones(1, 1, mel.shape[-1], device=self.dev)
        xt_ref = self.m.diffvc.diffused_reference(mel.expand(b, -1, -1), mask.expand(b, -1, -1),
                                                  mean_ref.expand(b, -1, -1), pool.t).unsqueeze(1)
        return self.m.diffvc.score(pool.x_t, pool.mask, pool.mean, xt_ref, mask.expand(b, -1, -1),
                                   c.expand(b, -1), pool.t, return_internals=True)

    @torch.no_grad()
    def _internals(self, ref: tuple[torch.Tensor, ...], pool: _Pool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, feats = [], []
        idx = torch.arange(pool.t.shape[0], device=self.dev)
        for chunk in idx.split(self.cfg.repeats):
            _, internals = self._score(ref, pool.take(chunk))
            logps.append(context_log_probs(summed_context(internals)))
            feats.append(internals.features)
        return torch.cat(logps), {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    def adversarial(self, delta: torch.Tensor) -> torch.Tensor:
        if self.band_rate is not None:
            n = delta.shape[-1]
            delta = resample(resample(delta, DIFFVC_RATE, self.band_rate), self.band_rate, DIFFVC_RATE)
            delta = torch.nn.functional.pad(delta, (0, max(0, n - delta.shape[-1])))[..., :n]
        return (self.x + delta).clamp(-1.0, 1.0)

    def objective(self, delta: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term (unweighted) at perturbation delta on pool draws idx; the hot path, one U-Net batch."""
        x_adv = self.adversarial(delta)
        x16 = resample(x_adv, DIFFVC_RATE, GE2E_RATE)
        c = self.m.ge2e.embed(x16 * self.gain)
        out: dict[str, torch.Tensor] = {}
        if self.weights["id"] > 0:
            terms = [identity_loss(c if e is self.m.ge2e else e.embed(x16), clean, cent)
                     for e, clean, cent in zip(self.id_encoders, self.emb_clean, self.centroids, strict=True)]
            out["id"] = torch.stack(terms).mean()
        if any(self.weights[k] > 0 for k in ("ctx", "score", "sem")):
            pool = self.pool.take(idx)
            mel = diffvc_mel(x_adv)
            ref = (mel, self.m.diffvc.average_voice(mel, self.ref_mask), c)
            score, internals = self._score(ref, pool)
            if self.weights["ctx"] > 0:
                out["ctx"] = context_loss(pool.logp_ref, summed_context(internals))
            if self.weights["score"] > 0:
                out["score"] = score_loss(score, pool.mask)
            if self.weights["sem"] > 0:
                out["sem"] = semantic_loss(internals.features, pool.feat_clean, pool.feat_noise)
        return out

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in losses.items())  # type: ignore[return-value]

    def run(self, on_iter: Callable[[int, dict[str, float]], None], cancel: CancelToken | None,
            gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        pool_size = self.pool.t.shape[0]
        order = torch.randperm(pool_size, generator=gen).to(self.dev)
        delta = torch.zeros_like(self.x)
        first = order[: cfg.repeats]
        history = []
        for it in range(cfg.iterations):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("protection cancelled")
            start = (it * cfg.repeats) % pool_size
            idx = order[start:start + cfg.repeats]
            delta.requires_grad_(True)
            losses = self.objective(delta, idx)
            grad, = torch.autograd.grad(self.total(losses), delta)
            with torch.no_grad():
                delta = delta.detach() + cfg.step_size * grad.sign()
                delta = delta.clamp(-cfg.epsilon, cfg.epsilon)
                delta = (self.x + delta).clamp(-1.0, 1.0) - self.x
            values = {k: float(v.detach()) for k, v in losses.items()}
            history.append(values)
            on_iter(it, values)
        with torch.no_grad():
            start_l = {k: float(v) for k, v in self.objective(torch.zeros_like(self.x), first).items()}
            end_l = {k: float(v) for k, v in self.objective(delta, first).items()}
        return delta.detach()[0], {"losses_start": start_l, "losses_end": end_l, "history": history,
                                   "gender": self.sex, "opposite_speaker": self.opposite.name}


# ---------------------------------------------------------------------------------------------------------
def window_plan(n: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) windows covering n samples; consecutive windows overlap by `overlap`."""
    if n <= window:
        return [(0, n)]
    hop = window - overlap
    count = math.ceil((n - overlap) / hop)
    starts = [min(i * hop, n - window) for i in range(count)]
    return [(s, s + window) for s in sorted(set(starts))]


def crossfade_weights(plan: list[tuple[int, int]], n: int) -> list[torch.Tensor]:
    """Per-window weights that sum to one everywhere: linear ramps where windows overlap."""
    cover = torch.zeros(n, dtype=torch.float64)
    raw = [torch.ones(b - a, dtype=torch.float64) for a, b in plan]
    for i, (a, b) in enumerate(plan):
        if i > 0 and plan[i - 1][1] > a:  # ramp in over the overlap with the previous window
            ov = plan[i - 1][1] - a
            ramp = (torch.arange(ov, dtype=torch.float64) + 0.5) / ov
            raw[i][:ov] = ramp
            raw[i - 1][-ov:] = 1.0 - ramp
    for (a, b), w in zip(plan, raw, strict=True):
        cover[a:b] += w
    assert torch.allclose(cover, torch.ones_like(cover)), "cross-fade weights must sum to one"
    return [w.float() for w in raw]


def protect(audio: np.ndarray, sample_rate: int, models: Models | None = None, config: ProtectConfig | None = None,
            progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> ProtectResult:
    """Cloak a recording: returns audio of the same shape and rate with |output - input| <= epsilon."""
    cfg = config or ProtectConfig()
    if models is None:
        from .bundle import load_models

        models = load_models()
    samples = validate_samples(audio, sample_rate, name="input audio")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    mono = samples if samples.ndim == 1 else samples.mean(axis=1)
    x = torch.from_numpy(mono.astype(np.float64)).float()
    x22 = resample(x, sample_rate, DIFFVC_RATE)
    n22 = x22.shape[-1]
    window = max(DIFFVC_HOP * 32, int(cfg.window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)
    overlap = int(cfg.overlap_seconds * DIFFVC_RATE)
    plan = window_plan(n22, window, overlap)
    weights = crossfade_weights(plan, n22)
    delta22 = torch.zeros(n22)
    per_window = []
    total_iters = max(1, len(plan) * cfg.iterations)

    for w_i, (a, b) in enumerate(plan):
        seg = x22[a:b]
        if seg.shape[-1] < DIFFVC_HOP * 16:  # too short for the U-Net: pad with silence for the attack
            seg = torch.nn.functional.pad(seg, (0, DIFFVC_HOP * 16 - seg.shape[-1]))
        attack = WindowAttack(models, cfg, seg, sample_rate, gen)

        def on_iter(it: int, losses: dict[str, float], w_i: int = w_i) -> None:
            if progress is None:
                return
            done = w_i * cfg.iterations + it + 1
            elapsed = time.perf_counter() - t0
            progress(Progress(w_i, len(plan), it + 1, cfg.iterations, losses, elapsed,
                              elapsed / done * (total_iters - done)))

        d, info = attack.run(on_iter, cancel, gen)
        d = d.cpu()
        full = torch.zeros(b - a)
        full[: min(d.shape[-1], b - a)] = d[: b - a]
        delta22[a:b] += full * weights[w_i]
        per_window.append(info)

    delta = resample(delta22, DIFFVC_RATE, sample_rate)
    frames = samples.shape[0]
    if delta.shape[-1] < frames:
        delta = torch.nn.functional.pad(delta, (0, frames - delta.shape[-1]))
    delta = delta[:frames].clamp(-cfg.epsilon, cfg.epsilon).numpy().astype(np.float32)
    out = samples + (delta if samples.ndim == 1 else delta[:, None])
    out = np.clip(out, -1.0, 1.0).astype(np.float32)
    diff = out.astype(np.float64) - samples.astype(np.float64)
    snr = 10 * math.log10(max(float(np.sum(samples.astype(np.float64) ** 2)), 1e-20) /
                          max(float(np.sum(diff**2)), 1e-20))
    mean_losses = {k: float(np.mean([w["losses_end"][k] for w in per_window])) for k in per_window[0]["losses_end"]}
    metrics: dict[str, Any] = {
        "snr_db": snr,
        "linf": float(np.max(np.abs(diff))),
        "losses_start": {k: float(np.mean([w["losses_start"][k] for w in per_window]))
                         for k in per_window[0]["losses_start"]},
        "losses_end": mean_losses,
        "iterations": cfg.iterations,
        "windows": len(plan),
        "seconds": time.perf_counter() - t0,
        "gender": per_window[0]["gender"],
        "opposite_speaker": per_window[0]["opposite_speaker"],
        "history": [w["history"] for w in per_window],
        "model": models.diffvc_id,
        "config": cfg.to_dict(),
        "loss_names": list(LOSS_NAMES),
    }
    return ProtectResult(out, sample_rate, metrics)
