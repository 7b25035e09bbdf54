"""The four VoiceCloak objectives (arXiv 2505.12332, Sec. 4), all *maximised* by the PGD ascent.

Interpretation choices where the paper is ambiguous (numbers refer to reference.md Sec. 5.4):
  L_ID    Algorithm 1's ascent form (1): 1 - cos(R(x_adv), R(x_ref)) + cos(R(x_adv), C_opp), averaged over the
          configured speaker encoders R (GE2E by default, WavLM-SV when the bundle has it) (2). C_opp is the
          L2-normalised mean of the normalised embeddings of all utterances of one opposite-gender speaker drawn
          per job from the shipped voice bank (3).
  L_ctx   DiffVC has self-attention only (4): the (B, 4, 32, 32) context matrices of the three down-path
          LinearAttention blocks `downs.{0,1,2}.2` are summed, softmaxed over the last axis; KL(P_ref || P_adv)
          summed over that axis and averaged over rows, heads and batch; P_ref (clean reference) is fixed (5).
  L_score Per-sample RMS of the score over the masked (80 x T) map, i.e. its L2 norm / sqrt(80 * frames), batch
          mean (9); one estimator call per repeat at t drawn from the first t_adv points of the T=100 sampler grid
          (8). Why RMS and not the plain L2 norm: near t = 1 the score is about -z / sigma, so its L2 norm is
          ~sqrt(80 * frames) (~124 for 192 frames) whatever the model, and with lambda_score = 10 it outweighed the
          other terms: measured on cloak-mini, the weighted L_score gradient was ~300x the L_ID one and the PGD sign
          followed it alone (sign agreement 0.997; L_ID 0.46, L_sem 0.28, i.e. chance). The RMS is O(1) and
          independent of the surrogate length, which is what the paper's weights imply.
  L_sem   Up-path features `ups.0`, `ups.1` (the two up blocks' outputs): 1 - cos(f_adv, f_clean) +
          cos(f_adv, f_noise), cosine over each sample's flattened feature, averaged over layers and batch.
          f_noise comes from Gaussian white noise used as both source and reference, fixed per job (10).
  L_voice Not in the paper; for a DiffVC with a speaker-adaptive prior (cloak-mini 2). Measured there: the decoder
          takes the voice from the prior's mean alone (a clone whose decoder gets another speaker's d-vector and
          reference mel, prior unchanged, keeps GE2E 0.704 to the reference speaker vs 0.706; whose prior gets them,
          0.588), so the paper's U-Net terms, which act on the decoder's reference inputs, cannot reach the voice.
          L_voice is L_ID's form on what the clone will sound like: the prior's mean for each surrogate source
          under the adversarial reference, heard by GE2E through `ge2e_frames_from_diffvc_mel` (no vocoder),
          pushed away from the same under the clean reference and toward the opposite-sex centroid of L_ID.
  Shared  Per repeat one (t, x_t, surrogate source) draw is used by every U-Net term (6); surrogate sources are
          other speakers' utterances of the protected speaker's gender (7).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .models.diffvc_decoder import DOWN_ATTN_KEYS, UP_FEATURE_KEYS, ScoreInternals


def identity_loss(emb_adv: torch.Tensor, emb_clean: torch.Tensor, centroid_opp: torch.Tensor) -> torch.Tensor:
    """1 - cos(adv, clean) + cos(adv, opposite-gender centroid), batch mean."""
    return (1.0 - F.cosine_similarity(emb_adv, emb_clean, dim=-1)
            + F.cosine_similarity(emb_adv, centroid_opp, dim=-1)).mean()


def voice_loss(emb_adv: torch.Tensor, emb_clean: torch.Tensor, centroid_opp: torch.Tensor) -> torch.Tensor:
    """L_voice: L_ID's form on GE2E embeddings (R, D) of the prior means of R surrogate sources under the
    adversarial and the clean reference; centroid (1, D) or (R, D)."""
    return identity_loss(emb_adv, emb_clean, centroid_opp)


def summed_context(internals: ScoreInternals, keys: tuple[str, ...] = DOWN_ATTN_KEYS) -> torch.Tensor:
    ctx = internals.contexts[keys[0]].float()
    for k in keys[1:]:
        ctx = ctx + internals.contexts[k].float()
    return ctx


def context_log_probs(ctx: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return torch.log_softmax(ctx.float(), dim=axis)


def context_loss(logp_ref: torch.Tensor, ctx_adv: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """KL(P_ref || P_adv) over `axis`, mean over the remaining axes."""
    logp_adv = context_log_probs(ctx_adv, axis)
    kl = (logp_ref.exp() * (logp_ref - logp_adv)).sum(axis)
    return kl.mean()


def score_loss(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS of the masked score (B, 80, T) over the masked region, batch mean."""
    norm = torch.linalg.vector_norm((score * mask).float().flatten(1), dim=1)
    cells = (mask.float().flatten(1).sum(1) * score.shape[1]).clamp_min(1.0)
    return (norm / cells.sqrt()).mean()


def sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine between each sample's whole feature map (B, ...) -> (B,). Reduces over every non-batch axis
    instead of flattening, so channels-last maps are not copied (a flatten of one is not a view)."""
    dims = tuple(range(1, a.dim()))
    a, b = a.float(), b.float()
    norm_a = a.square().sum(dims).sqrt().clamp_min(eps)
    norm_b = b.square().sum(dims).sqrt().clamp_min(eps)
    return (a * b).sum(dims) / (norm_a * norm_b)


def semantic_loss(feat_adv: dict[str, torch.Tensor], feat_clean: dict[str, torch.Tensor],
                  feat_noise: dict[str, torch.Tensor], keys: tuple[str, ...] = UP_FEATURE_KEYS) -> torch.Tensor:
    total = feat_adv[keys[0]].new_zeros((), dtype=torch.float32)
    for k in keys:
        a = feat_adv[k]
        total = total + (1.0 - sample_cosine(a, feat_clean[k]) + sample_cosine(a, feat_noise[k])).mean()
    return total / len(keys)
