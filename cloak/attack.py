"""One window's attack: everything its PGD needs, computed once (`WindowAttack`: the clean reference's features,
the opposite-sex target, the fixed pool of (t, surrogate source, x_t) draws and what the clean and noise references
give there), and the batched objective over several windows' perturbations (`objective`, the engine's hot path,
with the U-Net pass `unet_score` and the speaker-adaptive prior's pieces `prior_means` / `voice_embeddings`).

The PGD step and the resumable job that walks a clip's windows are in cloak.protect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import eot
from .bundle import BundleError, Models
from .config import LOSS_NAMES, ProtectConfig
from .features import DIFFVC_HOP, DIFFVC_RATE, GE2E_RATE, diffvc_mel, ge2e_frames_from_diffvc_mel, resample
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
from .perceptual import masking_threshold, snr_floor_power, under_snr_floor
from .pitch import DEFAULT_LOG_F0
from .quality import window_exponent

NO_TRANSFORM = eot.Draw("none")


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
            if self.needs_internals():  # the clean reference's U-Net internals serve L_ctx and L_sem only
                self.pool.logp_ref, self.pool.feat_clean = self._internals(clean_ref, self.pool)
            self._noise_features(gen)
            if self.weights["voice"] > 0:
                one = torch.zeros(self.pool.t.shape[0], dtype=torch.long, device=self.dev)
                mean = prior_means(models, clean_ref[0], clean_ref[2], self.pool, one)
                self.pool.voice_clean = voice_embeddings(models, mean, one, self.gain_t)
            # perceptual shaping (cloak.perceptual): per-bin bound on delta's STFT from this window's clean audio
            # unless fixed, its exponent chosen for this window's quality target (cloak.quality.window_exponent)
            self.masking_exponent: float | None = None
            self.predicted_pesq: float | None = None
            self.shaping_bound: torch.Tensor | None = None
            if cfg.shaping == "masking" and cfg.masking_exponent is None:
                self.masking_exponent, self.predicted_pesq, self.shaping_bound = window_exponent(
                    self.x[0], DIFFVC_RATE, cfg.masking_margin_db, cfg.epsilon, cfg.quality_target)
            elif cfg.shaping == "masking":
                self.masking_exponent = cfg.masking_exponent
                self.shaping_bound = masking_threshold(self.x[0], DIFFVC_RATE, cfg.masking_margin_db,
                                                       exponent=cfg.masking_exponent)
            # and the SNR floor it holds (cloak.perceptual.under_snr_floor), from the same clean audio
            self.snr_allowed = snr_floor_power(self.x[0]) if self.shaping_bound is not None else None
        self.order = torch.randperm(self.pool.t.shape[0], generator=gen).to(self.dev)
        # expectation over transformation (cloak.eot): drawn last, so a job without it draws what it always did
        self.sample_rate = sample_rate
        self.eot_plan = eot.with_ge2e_gains(eot.draw_plan(cfg.eot, cfg.iterations, gen), x16)

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
        noise = torch.randn(self.x.shape, generator=gen).to(self.dev) * rms  # drawn always: later draws stay put
        if self.weights["sem"] == 0:  # only L_sem reads them
            return
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

    def needs_internals(self) -> bool:
        """Whether this window's terms read the pool's U-Net internals (L_ctx: context log-probabilities; L_sem:
        up-path features of the clean and the noise reference). Without them the set-up skips those U-Net passes,
        so windows that differ here cannot share a U-Net batch (`ProtectionJob.batch_key`)."""
        return self.weights["ctx"] > 0 or self.weights["sem"] > 0

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
        """The U-Net internals of the reference `ref` on every draw of `pool`, in batches of the models'
        `rows_per_pass` (the steps' micro-batch: in fp32 on CPU, batches of 1 set a 7 s window up in 5.0 s instead
        of 7.2 s at 5; bf16 is indifferent), or of `repeats` where that is None."""
        logps, feats = [], []
        idx = torch.arange(pool.t.shape[0], device=self.dev)
        for chunk in idx.split(self.m.rows_per_pass or self.cfg.repeats):
            n = chunk.shape[0]
            _, internals = unet_score(self.m, tuple(r.expand(n, *r.shape[1:]) for r in ref), pool.take(chunk))
            logps.append(context_log_probs(summed_context(internals)))
            feats.append(internals.features)
        return torch.cat(logps), {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    def projected(self, delta: torch.Tensor) -> torch.Tensor:
        """The last projection of every step (after the epsilon box): with the masking shaping, the SNR floor
        (cloak.perceptual.under_snr_floor) against this window's clean audio; the paper's box has none."""
        return delta if self.snr_allowed is None else under_snr_floor(delta, self.snr_allowed)

    def adversarial(self, delta: torch.Tensor) -> torch.Tensor:
        if self.band_rate is not None:
            n = delta.shape[-1]
            delta = resample(resample(delta, DIFFVC_RATE, self.band_rate), self.band_rate, DIFFVC_RATE)
            delta = torch.nn.functional.pad(delta, (0, max(0, n - delta.shape[-1])))[..., :n]
        return (self.x + delta).clamp(-1.0, 1.0)

    def eot_draw(self, iteration: int) -> eot.Draw:
        """The transform (cloak.eot) of this iteration's step; "none" without EOT."""
        return self.eot_plan[iteration % len(self.eot_plan)] if self.eot_plan else NO_TRANSFORM

    def as_received(self, x_adv: torch.Tensor, draw: eot.Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """The adversarial window (N,) as the attacker gets it after `draw`, and its GE2E input gain (1,)."""
        return eot.apply(draw, x_adv, self.gain_t, self.sample_rate)

    def next_indices(self, iteration: int) -> torch.Tensor:
        """Pool draws of one iteration: a fixed per-window permutation walked `repeats` at a time, cyclically, so
        every iteration has `repeats` draws (engine 7 and earlier cut the walk at the pool's end: with the
        defaults, pool 12 and 5 repeats, iterations had 5, 5, 2, 5, 5, 1, ... draws, 4.2 on average)."""
        p = self.pool.t.shape[0]
        start = (iteration * self.cfg.repeats) % p
        return self.order[(start + torch.arange(self.cfg.repeats, device=self.order.device)) % p]


@dataclass
class Front:
    """What every pool row of one step shares: the adversarial windows as the attacker receives them (J, N), at
    16 kHz (J, N16), their GE2E input gains (J, 1), GE2E d-vectors (J, D), log-mels (J, 80, T) and average voices
    (J, 80, T; only when a U-Net term is on). `detached` cuts the graph here, for micro-batched rows."""

    x16: torch.Tensor
    gains: torch.Tensor
    c: torch.Tensor
    mel: torch.Tensor | None = None
    mean_ref: torch.Tensor | None = None

    TENSORS = ("c", "mel", "mean_ref")  # what the row terms differentiate through

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def detached(self) -> Front:
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in self.tensors().items()}
        return Front(self.x16, self.gains, **leaves)


def wanted(attacks: list[WindowAttack]) -> dict[str, bool]:
    """Which terms any of the windows has on."""
    return {k: any(a.weights[k] > 0 for a in attacks) for k in LOSS_NAMES}


def front(attacks: list[WindowAttack], deltas: torch.Tensor, draws: list[eot.Draw] | None = None) -> Front:
    """The shared part of `objective` at perturbations `deltas` (J, N): one GE2E batch of J, one mel batch."""
    a0 = attacks[0]
    m = a0.m
    received = [a.as_received(a.adversarial(d[None])[0], draw)
                for a, d, draw in zip(attacks, deltas, draws or [NO_TRANSFORM] * len(attacks), strict=True)]
    x_adv = torch.stack([r[0] for r in received])
    x16 = resample(x_adv, DIFFVC_RATE, GE2E_RATE)
    gains = torch.cat([r[1] for r in received])[:, None]
    f = Front(x16, gains, m.ge2e.embed(x16 * gains))
    want = wanted(attacks)
    if want["ctx"] or want["score"] or want["sem"] or want["voice"]:
        f.mel = diffvc_mel(x_adv)
        if want["ctx"] or want["score"] or want["sem"]:
            mask = torch.ones(f.mel.shape[0], 1, f.mel.shape[-1], device=a0.dev)
            f.mean_ref = m.diffvc.average_voice(f.mel, mask)
    return f


def identity_terms(attacks: list[WindowAttack], f: Front) -> list[dict[str, torch.Tensor]]:
    """L_ID of each window (empty dicts when no window has it on)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in attacks]
    if not wanted(attacks)["id"]:
        return out
    m = attacks[0].m
    embs = [f.c if e is m.ge2e else e.embed(f.x16) for e in attacks[0].id_encoders]
    for j, a in enumerate(attacks):
        terms = [identity_loss(emb[j:j + 1], clean, cent)
                 for emb, clean, cent in zip(embs, a.emb_clean, a.centroids, strict=True)]
        out[j]["id"] = torch.stack(terms).mean()
    return out


def row_terms(attacks: list[WindowAttack], f: Front, idxs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The terms read on pool draws (L_voice, L_ctx, L_score, L_sem) of each window on its draws idxs[j]: one
    U-Net batch of sum(len(idxs[j])). Each is a mean over the window's draws, so a window's term over all its
    draws is the draw-weighted mean of its terms over any split of them (what `cloak.protect.step_gradient` uses
    to micro-batch)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in attacks]
    want = wanted(attacks)
    if f.mel is None:
        return out
    m, dev = attacks[0].m, attacks[0].dev
    pools = [a.pool.take(i) for a, i in zip(attacks, idxs, strict=True)]
    counts = [p.t.shape[0] for p in pools]
    offsets = [0, *np.cumsum(counts).tolist()]
    pool = _Pool.cat(pools)
    mel, c = f.mel, f.c
    rep = torch.cat([torch.full((n,), j, device=dev, dtype=torch.long) for j, n in enumerate(counts)])
    # with a speaker-adaptive prior, one prior mean per pool row serves L_voice and the U-Net terms
    mean = prior_means(m, mel, c, pool, rep) if m.prior is not None else None
    if want["voice"]:
        emb = voice_embeddings(m, mean, rep, f.gains[:, 0])
        for j, a in enumerate(attacks):
            sl = slice(offsets[j], offsets[j + 1])
            out[j]["voice"] = voice_loss(emb[sl], pool.voice_clean[sl], a.voice_centroid)
    if f.mean_ref is not None:
        score, internals = unet_score(m, (mel[rep], f.mean_ref[rep], c[rep]), pool, mean)
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


def objective(attacks: list[WindowAttack], deltas: torch.Tensor, idxs: list[torch.Tensor],
              draws: list[eot.Draw] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every loss term (unweighted) of several windows (of any jobs with equal window length) at their
    perturbations `deltas` (J, N) on their pool draws: one GE2E/encoder batch of J, one U-Net batch of sum(R).
    `draws`: each window's transform of this step (cloak.eot; default none). Jobs do not interact (no batch
    statistics anywhere), so each job's gradient is its own."""
    f = front(attacks, deltas, draws)
    return [a | b for a, b in zip(identity_terms(attacks, f), row_terms(attacks, f, idxs), strict=True)]


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
