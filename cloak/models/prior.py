"""A speaker-adaptive prior for DiffVC: the source's "average voice" mean, moved into the reference's voice.

DiffVC's decoder takes the voice of a conversion from its prior mean far more readily than from its broadcast
condition vector (measured on cloak-mini: clones of one source with different references were 0.97-1.00
GE2E-identical, and adding the reference's long-term spectral offset to the mean moved them toward the reference).
So, as Grad-StyleSpeech's style-adaptive encoder and DDDM-VC's source-filter priors do, a small 1-D network with
mel bins as channels makes the mean speaker-specific before the diffusion decoder starts from it:

  filter  the average-voice mean is de-normalised with the reference's own spectral-envelope statistics (the exact
          inverse of the per-bin normalisation that defines cloak-mini's average-voice target, with the reference's
          liftered log-mel mean and spread over its voiced frames), then corrected by FiLM residual blocks
          conditioned on the reference (GE2E d-vector + those statistics);
  source  the source's log-F0 contour, normalised by its own statistics and moved to the reference's log-F0 mean
          and spread (predicted from the same condition), enters as a harmonic comb template on the mel axis, so the
          network renders harmonics at the reference's pitch.

Every input that depends on the reference (d-vector, reference log-mel) is differentiable, so an attack on the
reference waveform reaches the clone through the prior too. The source contour is data (measured by
`cloak.pitch`), not on the reference path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ..features import DIFFVC_FMAX, DIFFVC_MELS, DIFFVC_NFFT, DIFFVC_RATE, mel_centre_frequencies, mel_filterbank
from .diffvc_encoder import LayerNorm, Mish

LOG_FLOOR = math.log(1e-5)


@dataclass(frozen=True)
class PriorConfig:
    n_feats: int = DIFFVC_MELS
    spk_dim: int = 256  # GE2E d-vector
    hidden: int = 256
    cond_dim: int = 128
    layers: int = 6
    kernel: int = 5
    n_ceps: int = 24  # envelope liftering of the reference statistics (as cloak-mini's average-voice target)
    f0_grid: int = 480  # harmonic templates tabulated on a log-F0 grid between f0_lo and f0_hi
    f0_lo: float = 40.0
    f0_hi: float = 800.0
    # vocal-tract length: at conversion the source's mean is scaled along frequency by
    # (reference F0 / source F0) ** vtl_exponent (formants scale with F0 only loosely: ~1.17x between typical male
    # and female voices for ~1.9x in F0, i.e. ~0.25); 0 turns it off
    vtl_exponent: float = 0.0
    # pseudo-phone units: with n_units > 0 each frame of the source's normalised mean is replaced by the nearest of
    # n_units unit means (k-means over all training speakers' normalised means, in the `units` buffer), so what
    # is left of the source speaker inside a unit's frames goes; the source is not on the reference path, so the
    # hard assignment costs the attack nothing; 0 (checkpoints before it) keeps the normalised mean as it is
    n_units: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown prior config key(s): {sorted(unknown)}")
        return cls(**d)


def lifter_matrix(n: int, n_ceps: int) -> np.ndarray:
    """(n, n) projection that keeps the first n_ceps orthonormal DCT-II coefficients of a log-mel frame."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (i + 0.5) * k / n) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    keep = np.zeros(n)
    keep[:n_ceps] = 1.0
    return (d.T * keep) @ d


def harmonic_templates(f0s: np.ndarray, sigma_hz: float = 18.0) -> np.ndarray:
    """Log-mel of a flat-envelope harmonic comb at each F0 (len(f0s), 80), mean over bins removed: where the
    harmonics of that F0 fall on DiffVC's mel axis (resolved in the low bins, merged in the high ones)."""
    freqs = np.linspace(0.0, DIFFVC_RATE / 2, DIFFVC_NFFT // 2 + 1)
    basis = mel_filterbank(DIFFVC_RATE, DIFFVC_NFFT, DIFFVC_MELS, 0.0, DIFFVC_FMAX).astype(np.float64)
    out = np.empty((len(f0s), DIFFVC_MELS))
    for j, f0 in enumerate(f0s):
        harmonics = np.arange(1, int(DIFFVC_RATE / 2 / f0) + 1) * f0
        comb = np.exp(-0.5 * ((freqs[:, None] - harmonics[None, :]) / sigma_hz) ** 2).sum(1)
        mel = np.log(basis @ comb + 1e-2)
        out[j] = mel - mel.mean()
    return out.astype(np.float32)


def scale_frequency(mel: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale a log-mel (B, 80, T) along frequency by `factor` (B,) (> 1 moves formants up): output bin i takes the
    input at frequency f_i / factor, linearly interpolated between bin centres; differentiable in `factor`."""
    freqs = torch.from_numpy(mel_centre_frequencies()).to(mel)
    src = freqs[None, :] / factor[:, None]  # (B, 80): where each output bin reads the input
    pos = torch.searchsorted(freqs, src.detach().contiguous()).clamp(1, len(freqs) - 1)  # upper neighbour
    lo_f, hi_f = freqs[pos - 1], freqs[pos]
    w = ((src - lo_f) / (hi_f - lo_f)).clamp(0.0, 1.0)[..., None]  # (B, 80, 1)
    idx_lo = (pos - 1)[..., None].expand(-1, -1, mel.shape[-1])
    idx_hi = pos[..., None].expand(-1, -1, mel.shape[-1])
    return mel.gather(1, idx_lo) * (1 - w) + mel.gather(1, idx_hi) * w


def shift_contour(log_f0: torch.Tensor, voiced: torch.Tensor, target_mean: torch.Tensor,
                  target_std: torch.Tensor, min_std: float = 0.03) -> torch.Tensor:
    """Move a log-F0 contour (B, 1, T) to another speaker's log-F0 mean/std (B,): normalise it by its own voiced
    frames' statistics, rescale. Differentiable with respect to the target statistics."""
    w = voiced.to(log_f0.dtype)
    n = w.sum((1, 2)).clamp_min(1.0)
    mean = (log_f0 * w).sum((1, 2)) / n
    std = (((log_f0 - mean[:, None, None]) ** 2 * w).sum((1, 2)) / n).sqrt().clamp_min(min_std)
    z = (log_f0 - mean[:, None, None]) / std[:, None, None]
    return target_mean[:, None, None] + z * target_std[:, None, None]


class FiLMBlock(nn.Module):
    def __init__(self, hidden: int, cond_dim: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.norm = LayerNorm(hidden)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.act = Mish()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv1(x * mask))
        g, b = self.film(cond).chunk(2, dim=-1)
        h = self.act(h * (1 + g[..., None]) + b[..., None])
        return (x + self.conv2(h * mask)) * mask


@dataclass
class SpeakerCondition:
    """What the prior takes from a reference: FiLM vector, envelope statistics and predicted log-F0 statistics."""

    cond: torch.Tensor  # (B, cond_dim)
    env_mean: torch.Tensor  # (B, 80) liftered log-mel mean over voiced frames
    env_std: torch.Tensor  # (B, 80)
    f0_mean: torch.Tensor  # (B,) log-Hz
    f0_std: torch.Tensor  # (B,) log-Hz

    def select(self, idx: torch.Tensor) -> SpeakerCondition:
        """The conditions of rows `idx` (e.g. one reference's condition repeated for several sources)."""
        return SpeakerCondition(self.cond[idx], self.env_mean[idx], self.env_std[idx], self.f0_mean[idx],
                                self.f0_std[idx])


class SpeakerPrior(nn.Module):
    """mean_avg (B, 80, T) + source contour + reference condition -> a prior mean in the reference's voice."""

    def __init__(self, config: PriorConfig | None = None) -> None:
        super().__init__()
        cfg = config or PriorConfig()
        self.config = cfg
        n = cfg.n_feats
        # pooled ("average voice") envelope statistics the encoder's target was normalised to; set by training
        self.register_buffer("avg_mean", torch.zeros(n))
        self.register_buffer("avg_std", torch.ones(n))
        if cfg.n_units:
            self.register_buffer("units", torch.zeros(cfg.n_units, n))
        self.register_buffer("lifter", torch.from_numpy(lifter_matrix(n, cfg.n_ceps)).float(), persistent=False)
        grid = np.exp(np.linspace(math.log(cfg.f0_lo), math.log(cfg.f0_hi), cfg.f0_grid))
        self.register_buffer("templates", torch.from_numpy(harmonic_templates(grid)), persistent=False)
        self.cond_net = nn.Sequential(nn.Linear(cfg.spk_dim + 2 * n, 256), Mish(), nn.Linear(256, 256), Mish(),
                                      nn.Linear(256, cfg.cond_dim))
        self.f0_head = nn.Linear(cfg.cond_dim, 2)
        self.pre = nn.Conv1d(2 * n + 2, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2)
        self.blocks = nn.ModuleList(FiLMBlock(cfg.hidden, cfg.cond_dim, cfg.kernel) for _ in range(cfg.layers))
        self.post = nn.Conv1d(cfg.hidden, n, 1)
        nn.init.zeros_(self.post.weight)
        nn.init.zeros_(self.post.bias)

    # ---- the reference side (inside the attack graph) -------------------------------------------------------
    @staticmethod
    def _voiced_stats(x: torch.Tensor, energy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bin mean and std (B, F) of x (B, F, T) over voiced frames, weighted softly by a sigmoid of each
        frame's energy (B, 1, T) relative to the loudest frames, so the statistics stay differentiable."""
        loud = torch.where(mask > 0, energy, torch.full_like(energy, -1e4)).amax(-1, keepdim=True).detach()
        w = torch.sigmoid(2.0 * (energy - (loud - 3.5))) * mask
        n = w.sum(-1).clamp_min(1e-3)  # (B, 1)
        mean = (x * w).sum(-1) / n
        var = ((x - mean[..., None]) ** 2 * w).sum(-1) / n
        return mean, (var + 1e-4).sqrt()

    def envelope_stats(self, ref_mel: torch.Tensor, ref_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Liftered log-mel mean and std (B, 80) over the reference's voiced frames."""
        env = torch.einsum("fg,bgt->bft", self.lifter.to(ref_mel.dtype), ref_mel)
        return self._voiced_stats(env, ref_mel.mean(1, keepdim=True), ref_mask)

    @staticmethod
    def source_stats(mean_avg: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (B, 80) of the source's average-voice mean over its voiced frames: what is left of the
        source speaker's timbre in the encoder's output, removed before the reference's is put in."""
        return SpeakerPrior._voiced_stats(mean_avg, mean_avg.mean(1, keepdim=True), mask)

    def condition(self, c: torch.Tensor, ref_mel: torch.Tensor, ref_mask: torch.Tensor) -> SpeakerCondition:
        env_mean, env_std = self.envelope_stats(ref_mel, ref_mask)
        feats = torch.cat([torch.nn.functional.normalize(c, dim=-1),
                           (env_mean - self.avg_mean) / self.avg_std, torch.log(env_std / self.avg_std)], -1)
        cond = self.cond_net(feats)
        f0 = self.f0_head(cond)
        return SpeakerCondition(cond, env_mean, env_std, 5.0 + f0[:, 0], torch.exp(f0[:, 1] - 2.0))

    # ---- the source side ---------------------------------------------------------------------------------------
    def template(self, log_f0: torch.Tensor, voiced: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) log-F0 -> (B, 80, T) harmonic template, linearly interpolated on the log-F0 grid (so it is
        differentiable in F0), zero on unvoiced frames."""
        cfg = self.config
        lo, hi = math.log(cfg.f0_lo), math.log(cfg.f0_hi)
        pos = ((log_f0[:, 0] - lo) / (hi - lo) * (cfg.f0_grid - 1)).clamp(0, cfg.f0_grid - 1)  # (B, T)
        i0 = pos.detach().floor().long().clamp(max=cfg.f0_grid - 2)
        frac = (pos - i0.to(pos.dtype))[:, None, :]
        tab = self.templates.to(log_f0.dtype)
        t0 = tab[i0].transpose(1, 2)  # (B, 80, T)
        t1 = tab[i0 + 1].transpose(1, 2)
        return (t0 * (1 - frac) + t1 * frac) * voiced.to(log_f0.dtype)

    def base_mean(self, mean_avg: torch.Tensor, mask: torch.Tensor, spk: SpeakerCondition,
                  src_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The source's average-voice mean normalised per bin over its voiced frames (`src_stats`, default: its own
        statistics) and re-styled with the reference's envelope statistics."""
        m, s = self.source_stats(mean_avg, mask) if src_stats is None else src_stats
        z = (mean_avg - m[..., None]) / s[..., None]
        if self.config.n_units:
            z = self.quantise(z)
        return z * spk.env_std[..., None] + spk.env_mean[..., None]

    def quantise(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised means (B, 80, T) -> the nearest unit mean of every frame (no gradient to the source)."""
        units = self.units.to(z.dtype)
        with torch.no_grad():
            flat = z.detach().transpose(1, 2).reshape(-1, z.shape[1])
            idx = torch.cdist(flat.float(), self.units.float()).argmin(-1)
        return units[idx].reshape(z.shape[0], z.shape[2], -1).transpose(1, 2)

    def forward(self, mean_avg: torch.Tensor, mask: torch.Tensor, log_f0: torch.Tensor, voiced: torch.Tensor,
                spk: SpeakerCondition, src_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """mean_avg, mask (B, 1, T), log_f0/voiced (B, 1, T) already at the target pitch -> prior mean (B, 80, T).
        `src_stats`: the source's statistics when mean_avg is a crop of a longer utterance (training)."""
        base = self.base_mean(mean_avg, mask, spk, src_stats)
        v = voiced.to(mean_avg.dtype)
        f0_in = (log_f0 - 5.0) * v
        x = torch.cat([base, self.template(log_f0, voiced), f0_in, v], 1)
        h = self.pre(x * mask)
        for block in self.blocks:
            h = block(h, mask, spk.cond)
        return (base + self.post(h)).clamp_min(LOG_FLOOR) * mask

    def convert_mean(self, mean_avg: torch.Tensor, mask: torch.Tensor, src_log_f0: torch.Tensor,
                     src_voiced: torch.Tensor, spk: SpeakerCondition) -> torch.Tensor:
        """The conversion-time mean: the source's contour moved to the reference's predicted pitch statistics and,
        with `vtl_exponent`, its spectrum scaled along frequency toward the reference's vocal-tract length."""
        log_f0 = shift_contour(src_log_f0, src_voiced, spk.f0_mean, spk.f0_std)
        k = self.config.vtl_exponent
        if k:
            w = src_voiced.to(src_log_f0.dtype)
            src_mean = (src_log_f0 * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1.0)
            mean_avg = scale_frequency(mean_avg, torch.exp(k * (spk.f0_mean - src_mean)).clamp(0.7, 1.4)) * mask
        return self(mean_avg, mask, log_f0, src_voiced, spk)


def prior_from_checkpoint(obj: object, device: str | torch.device = "cpu",
                          source: str = "checkpoint") -> SpeakerPrior | None:
    """The speaker-adaptive prior of a loaded cloak-mini-2 checkpoint (strict load); None for checkpoints without
    one (official DiffVC state dicts, version-1 cloak checkpoints). `source` names it in errors."""
    if not (isinstance(obj, dict) and "prior_state_dict" in obj):
        return None
    try:
        prior = SpeakerPrior(PriorConfig.from_dict(obj["prior_config"]))
        prior.load_state_dict(obj["prior_state_dict"], strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{source}: speaker-adaptive prior does not load: {e}") from e
    return prior.to(device).eval().requires_grad_(False)


def load_prior(path: str, device: str | torch.device = "cpu") -> SpeakerPrior | None:
    """`prior_from_checkpoint` of a checkpoint file."""
    return prior_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True), device, source=path)
