"""A naive reference PGD loop: one U-Net call per repeat, nothing cached (clean-reference internals, noise
features, reference mel/encoder/d-vector recomputed for every call), fp32. Same draws and settings as the
engine, so the two can be compared for speed and for the perturbation they produce."""

from __future__ import annotations

import copy

import numpy as np
import torch

from cloak.bundle import Models
from cloak.config import ProtectConfig
from cloak.features import DIFFVC_RATE, GE2E_RATE, resample
from cloak.losses import context_log_probs, summed_context
from cloak.protect import ProtectionJob, objective, unet_score


def naive_window_delta(audio: np.ndarray, sr: int, models: Models, cfg: ProtectConfig) -> torch.Tensor:
    """PGD on the first window only; returns its 22.05 kHz delta."""
    job = ProtectionJob(audio, sr, models, cfg)
    attack = job.prepare()
    delta = torch.zeros_like(attack.x[0])
    for it in range(cfg.iterations):
        grad = torch.zeros_like(delta)
        for i in attack.next_indices(it).tolist():
            idx = torch.tensor([i])
            with torch.no_grad():
                x16 = resample(attack.x, DIFFVC_RATE, GE2E_RATE)
                clean_ref = attack.reference(attack.x, x16 * attack.gain)
                _, clean = unet_score(models, clean_ref, attack.pool.take(idx))
                _, noise = unet_score(models, attack.noise_ref, attack.noise_pool.take(attack.t_index[idx]))
            one = copy.copy(attack)
            one.pool = attack.pool.take(idx)
            with torch.no_grad():  # the surrogate source's encoder mean and x_t, recomputed too
                dec = models.diffvc.decoder
                src, mask, t = attack.src[idx], one.pool.mask, one.pool.t
                one.pool.mean = models.diffvc.average_voice(src, mask)
                one.pool.x_t = (dec.compute_diffused_mean(src, mask, one.pool.mean, t)
                                + attack.z[idx] * torch.sqrt(dec.variance(t))) * mask
            one.pool.logp_ref = context_log_probs(summed_context(clean))
            one.pool.feat_clean = clean.features
            one.pool.feat_noise = noise.features
            d = delta.clone()[None].requires_grad_(True)
            losses = objective([one], d, [torch.tensor([0])])[0]
            total = sum(one.weights[k] * v for k, v in losses.items())
            grad += torch.autograd.grad(total, d)[0][0] / cfg.repeats
        with torch.no_grad():
            delta = (delta + cfg.step_size * grad.sign()).clamp(-cfg.epsilon, cfg.epsilon)
            delta = (attack.x[0] + delta).clamp(-1, 1) - attack.x[0]
    return delta
