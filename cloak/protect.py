"""The PGD engine: VoiceCloak's l-infinity attack on DiffVC's reference path.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .audio import fit_to_budget, validate_samples
from .bundle import BundleError, Models
from .config import LOSS_NAMES, ProtectConfig
from .early_stop import AttackerCheck, unavailable_reason
from .features import DIFFVC_HOP, DIFFVC_RATE, GE2E_RATE, diffvc_mel, ge2e_frames_from_diffvc_mel, resample
from .jobs import Cancelled, CancelToken, Progress, ProgressFn, ProtectResult
from .losses import (
    context_log_probs,
    context_loss,
    identity_loss,
    score_loss,
    semantic_loss,
    summed_context,
    voice_loss,
)
from .models.diffvc_decoder import ScoreInternals
from .models.ge2e import volume_gain
from .perceptual import masking_threshold, project_spectral, shaped_step
from .pitch import DEFAULT_LOG_F0

# Changes whenever the same settings would give a different perturbation (caches of protected audio key on it).
ENGINE_VERSION = "5: L_voice; the prior mean taken once per reference, shared by every term (rounding differs from 4)"


# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Pool:
    """Per-job fixed draws (t, x_t, surrogate source) and what the clean and noise references give there.

    With a speaker-adaptive prior the prior mean, hence x_t, depends on the reference: then `mean` holds the
    source's average voice, and `src`, `noise` (the scaled noise of x_t) and the source contour (`log_f0`,
    `voiced`) let every U-Net pass rebuild mean and x_t from the (adversarial) reference inside the graph."""

    t: torch.Tensor  # (P,)
    x_t: torch.Tensor  # (P, 80, S)
    mean: torch.Tensor  # (P, 80, S)
    mask: torch.Tensor  # (P, 1, S)
    logp_ref: torch.Tensor | None = None  # (P, 4, 32, 32)
    feat_clean: dict[str, torch.Tensor] = field(default_factory=dict)
    feat_noise: dict[str, torch.Tensor] = field(default_factory=dict)
    src: torch.Tensor | None = None  # (P, 80, S)
    noise: torch.Tensor | None = None  # (P, 80, S)
    log_f0: torch.Tensor | None = None  # (P, 1, S)
    voiced: torch.Tensor | None = None  # (P, 1, S)
    voice_clean: torch.Tensor | None = None  # (P, D) GE2E of the prior mean under the clean reference (L_voice)

    _PRIOR_FIELDS = ("src", "noise", "log_f0", "voiced", "voice_clean")

    def take(self, idx: torch.Tensor) -> _Pool:
        extra = {k: None if getattr(self, k) is None else getattr(self, k)[idx] for k in self._PRIOR_FIELDS}
        return _Pool(self.t[idx], self.x_t[idx], self.mean[idx], self.mask[idx],
                     None if self.logp_ref is None else self.logp_ref[idx],
                     {k: v[idx] for k, v in self.feat_clean.items()},
                     {k: v[idx] for k, v in self.feat_noise.items()}, **extra)

    @staticmethod
    def cat(pools: list[_Pool]) -> _Pool:
        if len(pools) == 1:
            return pools[0]
        extra = {k: None if getattr(pools[0], k) is None else torch.cat([getattr(p, k) for p in pools])
                 for k in _Pool._PRIOR_FIELDS}
        return _Pool(torch.cat([p.t for p in pools]), torch.cat([p.x_t for p in pools]),
                     torch.cat([p.mean for p in pools]), torch.cat([p.mask for p in pools]),
                     torch.cat([p.logp_ref for p in pools]) if pools[0].logp_ref is not None else None,
                     {k: torch.cat([p.feat_clean[k] for p in pools]) for k in pools[0].feat_clean},
                     {k: torch.cat([p.feat_noise[k] for p in pools]) for k in pools[0].feat_noise}, **extra)


def pool_size_for(cfg: ProtectConfig) -> int:
    """Fixed draws per window: twice max(repeats, t_adv), a multiple of t_adv (12 with the paper's settings).
    Their clean-reference internals are computed once, so set-up costs ~pool/repeats iterations' forwards."""
    base = 2 * max(cfg.repeats, cfg.t_adv)
    return math.ceil(base / cfg.t_adv) * cfg.t_adv


class WindowAttack:
    """Everything one window's PGD needs, precomputed once; `objective` is the batched hot path."""

    def __init__(self, models: Models, cfg: ProtectConfig, x22: torch.Tensor, sample_rate: int,
                 gen: torch.Generator) -> None:
        self.m = models
        self.cfg = cfg
        self.dev = models.device
        self.weights = voice_applicable(cfg.loss_weights, models)
        self.band_rate = sample_rate if sample_rate < DIFFVC_RATE else None
        n = x22.shape[-1] // DIFFVC_HOP * DIFFVC_HOP
        self.x = x22[:n].to(self.dev)[None]  # (1, N)
        self.n_frames = n // DIFFVC_HOP
        self.ref_mask = torch.ones(1, 1, self.n_frames, device=self.dev)
        with torch.no_grad():
            x16 = resample(self.x, DIFFVC_RATE, GE2E_RATE)
            self.gain = volume_gain(x16)
            self.gain_t = torch.full((1,), self.gain, device=self.dev, dtype=x16.dtype)  # no host copy per step
            self.id_encoders = models.speaker_encoders(cfg.id_encoders)
            self.emb_clean = [e.embed(x16 * self.gain if e is models.ge2e else x16) for e in self.id_encoders]
            self.sex = cfg.gender[0].upper() if cfg.gender != "auto" else \
                models.bank.classify_sex(self.emb_clean_ge2e(x16))
            self._identity_targets(gen)
            self._draw_pool(gen)
            clean_ref = self.reference(self.x, x16 * self.gain)
            self.pool.logp_ref, self.pool.feat_clean = self._internals(clean_ref, self.pool)
            self._noise_features(gen)
            if self.weights["voice"] > 0:
                one = torch.zeros(self.pool.t.shape[0], dtype=torch.long, device=self.dev)
                mean = prior_means(models, clean_ref[0], clean_ref[2], self.pool, one)
                self.pool.voice_clean = voice_embeddings(models, mean, one, self.gain_t)
            # perceptual shaping (cloak.perceptual): per-bin bound on delta's STFT from this window's clean audio
            self.shaping_bound = masking_threshold(self.x[0], DIFFVC_RATE, cfg.masking_margin_db,
                                                   exponent=cfg.masking_exponent) \
                if cfg.shaping == "masking" else None
        self.order = torch.randperm(self.pool.t.shape[0], generator=gen).to(self.dev)

    def _identity_targets(self, gen: torch.Generator) -> None:
        """The opposite-sex centroid(s) L_ID pulls toward, one speaker drawn per window."""
        models = self.m
        opp_sex = "F" if self.sex == "M" else "M"
        if all(e is models.ge2e for e in self.id_encoders):
            # GE2E only: one of the shipped opposite-sex centroids (embeddings of corpus-train speakers)
            bank = models.bank.ge2e_bank
            candidates = bank.of_sex(opp_sex)
            choice = candidates[int(torch.randint(len(candidates), (1,), generator=gen))]
            self.opposite_name = bank.names[choice]
            self.centroids = [bank.centroids[choice:choice + 1].to(self.dev)]
            self.voice_centroid = self.centroids[0]
        else:
            # other encoders need audio: a voice-bank speaker, its centroid computed with each encoder
            opp = models.bank.of_sex(opp_sex)
            speaker = opp[int(torch.randint(len(opp), (1,), generator=gen))]
            self.opposite_name = speaker.name
            self.centroids = [models.bank.centroid(e, speaker, self.dev) for e in self.id_encoders]
            self.voice_centroid = models.bank.centroid(models.ge2e, speaker, self.dev)

    def _draw_pool(self, gen: torch.Generator) -> None:
        """Fixed (t, surrogate source, x_t) draws, t stratified over the first t_adv sampler grid points;
        sources are voice-bank speakers of the protected speaker's sex."""
        cfg, dv = self.cfg, self.m.diffvc
        grid = [1.0 - i / cfg.inference_steps for i in range(cfg.t_adv)]
        pool_size = pool_size_for(cfg)
        sources = self.m.bank.of_sex(self.sex)
        crops = []
        for _ in range(pool_size):
            spk = sources[int(torch.randint(len(sources), (1,), generator=gen))]
            crops.append(self.m.bank.source_crop(spk, cfg.source_frames, gen, pitch=self.m.prior is not None))
        src = torch.stack([c.mel for c in crops]).to(self.dev)
        mask = torch.ones(pool_size, 1, cfg.source_frames, device=self.dev)
        self.t_index = torch.arange(pool_size, device=self.dev) % cfg.t_adv
        t = torch.tensor(grid, device=self.dev)[self.t_index]
        z = torch.randn(src.shape, generator=gen).to(self.dev)
        mean = torch.cat([dv.average_voice(s, m) for s, m in zip(src.split(cfg.repeats), mask.split(cfg.repeats),
                                                                 strict=True)])
        noise = z * torch.sqrt(dv.decoder.variance(t))
        x_t = dv.decoder.compute_diffused_mean(src, mask, mean, t) + noise
        self.pool = _Pool(t, x_t * mask, mean, mask)
        if self.m.prior is not None:
            self.pool.src, self.pool.noise = src, noise
            self.pool.log_f0 = torch.stack([c.log_f0 for c in crops]).to(self.dev)
            self.pool.voiced = torch.stack([c.voiced for c in crops]).to(self.dev)
        self.src, self.z = src, z
        self.sources = crops

    def _noise_features(self, gen: torch.Generator) -> None:
        """Up-path features with white noise (same length and RMS as the window) as both source and reference.
        They depend on t only: one draw per grid point, shared by the pool entries at that t."""
        cfg, dv, pool = self.cfg, self.m.diffvc, self.pool
        rms = float(self.x.pow(2).mean().sqrt().clamp_min(1e-4))
        noise = torch.randn(self.x.shape, generator=gen).to(self.dev) * rms
        n16 = resample(noise, DIFFVC_RATE, GE2E_RATE)
        self.noise_ref = self.reference(noise, n16 * volume_gain(n16))
        nmel = self.noise_ref[0][..., : cfg.source_frames]
        if nmel.shape[-1] < cfg.source_frames:
            nmel = nmel.repeat(1, 1, math.ceil(cfg.source_frames / nmel.shape[-1]))[..., : cfg.source_frames]
        tg, zg, mg = pool.t[: cfg.t_adv], self.z[: cfg.t_adv], pool.mask[: cfg.t_adv]
        nmean = dv.average_voice(nmel, mg[:1])
        nnoise = zg * torch.sqrt(dv.decoder.variance(tg))
        nx_t = dv.decoder.compute_diffused_mean(nmel, mg, nmean, tg) + nnoise
        self.noise_pool = _Pool(tg, nx_t * mg, nmean.expand(cfg.t_adv, -1, -1), mg)
        if self.m.prior is not None:  # noise has no pitch: unvoiced throughout
            self.noise_pool.src, self.noise_pool.noise = nmel.expand(cfg.t_adv, -1, -1), nnoise
            self.noise_pool.voiced = torch.zeros_like(mg)
            self.noise_pool.log_f0 = torch.full_like(mg, DEFAULT_LOG_F0)
        _, feats = self._internals(self.noise_ref, self.noise_pool)
        pool.feat_noise = {k: v[self.t_index] for k, v in feats.items()}

    def emb_clean_ge2e(self, x16: torch.Tensor) -> torch.Tensor:
        for e, emb in zip(self.id_encoders, self.emb_clean, strict=True):
            if e is self.m.ge2e:
                return emb
        return self.m.ge2e.embed(x16 * self.gain)

    def reference(self, wave22: torch.Tensor, wave16: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ref mel, mean_ref, d-vector) of a reference waveform."""
        mel = diffvc_mel(wave22)
        mask = torch.ones(1, 1, mel.shape[-1], device=self.dev)
        return mel, self.m.diffvc.average_voice(mel, mask), self.m.ge2e.embed(wave16)

    @torch.no_grad()
    def _internals(self, ref: tuple[torch.Tensor, ...], pool: _Pool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, feats = [], []
        idx = torch.arange(pool.t.shape[0], device=self.dev)
        for chunk in idx.split(self.cfg.repeats):
            n = chunk.shape[0]
            _, internals = unet_score(self.m, tuple(r.expand(n, *r.shape[1:]) for r in ref), pool.take(chunk))
            logps.append(context_log_probs(summed_context(internals)))
            feats.append(internals.features)
        return torch.cat(logps), {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    def adversarial(self, delta: torch.Tensor) -> torch.Tensor:
        if self.band_rate is not None:
            n = delta.shape[-1]
            delta = resample(resample(delta, DIFFVC_RATE, self.band_rate), self.band_rate, DIFFVC_RATE)
            delta = torch.nn.functional.pad(delta, (0, max(0, n - delta.shape[-1])))[..., :n]
        return (self.x + delta).clamp(-1.0, 1.0)

    def next_indices(self, iteration: int) -> torch.Tensor:
        """Pool draws of one iteration: a fixed per-window permutation walked `repeats` at a time."""
        p = self.pool.t.shape[0]
        start = (iteration * self.cfg.repeats) % p
        return self.order[start:start + self.cfg.repeats]


def objective(attacks: list[WindowAttack], deltas: torch.Tensor,
              idxs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every loss term (unweighted) of several windows (of any jobs with equal window length) at their
    perturbations `deltas` (J, N) on their pool draws: one GE2E/encoder batch of J, one U-Net batch of sum(R).
    Jobs do not interact (no batch statistics anywhere), so each job's gradient is its own."""
    a0 = attacks[0]
    m, dev = a0.m, a0.dev
    x_adv = torch.cat([a.adversarial(d[None]) for a, d in zip(attacks, deltas, strict=True)])
    x16 = resample(x_adv, DIFFVC_RATE, GE2E_RATE)
    gains = torch.cat([a.gain_t for a in attacks])[:, None]
    c = m.ge2e.embed(x16 * gains)
    out: list[dict[str, torch.Tensor]] = [{} for _ in attacks]
    want = {k: any(a.weights[k] > 0 for a in attacks) for k in LOSS_NAMES}
    if want["id"]:
        embs = [c if e is m.ge2e else e.embed(x16) for e in a0.id_encoders]
        for j, a in enumerate(attacks):
            terms = [identity_loss(emb[j:j + 1], clean, cent)
                     for emb, clean, cent in zip(embs, a.emb_clean, a.centroids, strict=True)]
            out[j]["id"] = torch.stack(terms).mean()
    if not (want["ctx"] or want["score"] or want["sem"] or want["voice"]):
        return out
    pools = [a.pool.take(i) for a, i in zip(attacks, idxs, strict=True)]
    counts = [p.t.shape[0] for p in pools]
    offsets = [0, *np.cumsum(counts).tolist()]
    pool = _Pool.cat(pools)
    mel = diffvc_mel(x_adv)
    rep = torch.cat([torch.full((n,), j, device=dev, dtype=torch.long) for j, n in enumerate(counts)])
    # with a speaker-adaptive prior, one prior mean per pool row serves L_voice and the U-Net terms
    mean = prior_means(m, mel, c, pool, rep) if m.prior is not None else None
    if want["voice"]:
        emb = voice_embeddings(m, mean, rep, gains[:, 0])
        for j, a in enumerate(attacks):
            sl = slice(offsets[j], offsets[j + 1])
            out[j]["voice"] = voice_loss(emb[sl], pool.voice_clean[sl], a.voice_centroid)
    if want["ctx"] or want["score"] or want["sem"]:
        mask = torch.ones(mel.shape[0], 1, mel.shape[-1], device=dev)
        mean_ref = m.diffvc.average_voice(mel, mask)
        score, internals = unet_score(m, (mel[rep], mean_ref[rep], c[rep]), pool, mean)
        ctx = summed_context(internals) if want["ctx"] else None
        for j in range(len(attacks)):
            sl = slice(offsets[j], offsets[j + 1])
            if want["ctx"]:
                out[j]["ctx"] = context_loss(pool.logp_ref[sl], ctx[sl])
            if want["score"]:
                out[j]["score"] = score_loss(score[sl], pool.mask[sl])
            if want["sem"]:
                out[j]["sem"] = semantic_loss({k: v[sl] for k, v in internals.features.items()},
                                              {k: v[sl] for k, v in pool.feat_clean.items()},
                                              {k: v[sl] for k, v in pool.feat_noise.items()})
    return out


def unet_score(m: Models, ref: tuple[torch.Tensor, ...], pool: _Pool,
               prior_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, ScoreInternals]:
    """U-Net pass for pool draws with per-row references (mel, mean_ref, c), each of batch = len(pool).
    With a speaker-adaptive prior the reference also sets the prior mean and with it x_t (inside the graph);
    `prior_mean` is that mean when the caller has it already (`prior_means`)."""
    mel, mean_ref, c = ref
    b = pool.t.shape[0]
    mask = torch.ones(b, 1, mel.shape[-1], device=mel.device)
    xt_ref = m.diffvc.diffused_reference(mel, mask, mean_ref, pool.t).unsqueeze(1)
    mean, x_t = pool.mean, pool.x_t
    if m.prior is not None:
        mean = prior_means(m, mel, c, pool, torch.arange(b, device=mel.device)) if prior_mean is None else prior_mean
        x_t = (m.diffvc.decoder.compute_diffused_mean(pool.src, pool.mask, mean, pool.t) + pool.noise) * pool.mask
    amp = m.amp_dtype
    with torch.autocast(mel.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        score, internals = m.diffvc.score(x_t, pool.mask, mean, xt_ref, mask, c, pool.t,
                                          return_internals=True)
    return score.float(), internals


def voice_applicable(weights: dict[str, float], models: Models) -> dict[str, float]:
    """The loss weights a job runs with: L_voice needs a speaker-adaptive prior (cloak-mini 2); with a DiffVC
    without one it is skipped, and a job that asked for nothing else is refused (BundleError)."""
    if models.prior is not None or weights["voice"] == 0:
        return weights
    if not any(w > 0 for k, w in weights.items() if k != "voice"):
        raise BundleError("the voice loss (L_voice) needs a DiffVC with a speaker-adaptive prior (cloak-mini 2); "
                          f"this model ({models.diffvc_id}) has none: add other loss terms")
    return weights | {"voice": 0.0}


def prior_means(m: Models, mel: torch.Tensor, c: torch.Tensor, pool: _Pool, rep: torch.Tensor) -> torch.Tensor:
    """The speaker-adaptive prior's mean (R, 80, S) for each of the pool's R surrogate sources, row r conditioned
    on reference rep[r] (log-mels (J, 80, T), d-vectors (J, D)); each reference's condition is taken once."""
    assert m.prior is not None
    mask = torch.ones(mel.shape[0], 1, mel.shape[-1], device=mel.device)
    spk = m.prior.condition(c, mel, mask).select(rep)
    return m.prior.convert_mean(pool.mean, pool.mask, pool.log_f0, pool.voiced, spk)


def voice_embeddings(m: Models, mean: torch.Tensor, rep: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """GE2E embeddings (R, D) of prior means (R, 80, S) (`prior_means`), row r of reference rep[r] whose GE2E
    volume gain is gains[rep[r]]: what the clone will sound like, heard without a vocoder
    (`ge2e_frames_from_diffvc_mel`). The gain puts the mean at GE2E's level."""
    log_mel = mean + torch.log(gains.to(mean.dtype))[rep][:, None, None]
    return m.ge2e.embed_frames(ge2e_frames_from_diffvc_mel(log_mel))


def within_budget(x: torch.Tensor, d: torch.Tensor, eps: float) -> torch.Tensor:
    """d clipped to the epsilon box, x + d kept within full scale, then the box again (a resampled x can
    overshoot 1 by more than eps)."""
    return ((x + d.clamp(-eps, eps)).clamp(-1.0, 1.0) - x).clamp(-eps, eps)


def pgd_step(jobs: list[ProtectionJob]) -> None:
    """One PGD iteration for every job in the group (equal window lengths), sharing one U-Net batch."""
    attacks = [j.attack for j in jobs]
    deltas = torch.stack([j.delta for j in jobs]).requires_grad_(True)
    idxs = [a.next_indices(j.iteration) for a, j in zip(attacks, jobs, strict=True)]
    losses = objective(attacks, deltas, idxs)
    total = sum(sum(a.weights[k] * v for k, v in ls.items()) for a, ls in zip(attacks, losses, strict=True))
    grad, = torch.autograd.grad(total, deltas)
    with torch.no_grad():
        for j, job in enumerate(jobs):
            cfg = job.cfg
            x = job.attack.x[0]
            if job.attack.shaping_bound is None:  # the paper's sign step in the box
                d = job.delta + cfg.step_size * grad[j].sign()
            else:  # its analogue under the clean audio's masking threshold (cloak.perceptual), then the box
                d = shaped_step(job.delta, grad[j], job.attack.shaping_bound, cfg.step_size / cfg.epsilon)
            job.delta = within_budget(x, d, cfg.epsilon)
            job.after_step({k: v.detach() for k, v in losses[j].items()})  # tensors: no host sync per step


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
    for i, (a, _) in enumerate(plan):
        if i > 0 and plan[i - 1][1] > a:  # ramp in over the overlap with the previous window
            ov = plan[i - 1][1] - a
            ramp = (torch.arange(ov, dtype=torch.float64) + 0.5) / ov
            raw[i][:ov] = ramp
            raw[i - 1][-ov:] = 1.0 - ramp
    for (a, b), w in zip(plan, raw, strict=True):
        cover[a:b] += w
    assert torch.allclose(cover, torch.ones_like(cover)), "cross-fade weights must sum to one"
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
        window = max(DIFFVC_HOP * 32, int(self.cfg.window_seconds * DIFFVC_RATE) // DIFFVC_HOP * DIFFVC_HOP)
        self.plan = window_plan(n22, window, int(self.cfg.overlap_seconds * DIFFVC_RATE))
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
        return within_budget(x, d, eps)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs whose prepared windows have equal keys can share one U-Net batch. Call `prepare()` first: the key
        is read from the current window's attack, never built here."""
        if self.attack is None:
            raise RuntimeError("batch_key() of a window that is not prepared: call prepare() first")
        return (self.attack.x.shape[-1], self.cfg.source_frames, self.cfg.id_encoders)

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
        with torch.no_grad():
            start, end = objective([attack, attack], torch.stack([zero, self.delta]), [self.first_idx] * 2)
        a, b = self.plan[self.window]
        d = self.delta.detach().cpu()
        full = torch.zeros(b - a)
        full[: min(d.shape[-1], b - a)] = d[: b - a]
        self.delta22[a:b] += full * self.weights[self.window]
        self.per_window.append({"losses_start": _floats([start])[0], "losses_end": _floats([end])[0],
                                "history": _floats(self.history), "gender": attack.sex,
                                "opposite_speaker": attack.opposite_name, "iterations": self.iteration,
                                "early_stop_checks": self.checks})
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
