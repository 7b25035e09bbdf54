"""Evaluation metrics, each computed by the real library or model that defines it.

- Identity: speaker-embedding cosine against an enrollment (mean of L2-normalised embeddings of clean utterances),
  with GE2E (always), the shipped black-box verifier (`cloak.models.verifier`), WavLM-SV (when the bundle has it),
  ECAPA (when an ECAPA model is configured).
- ASV calibration: equal-error-rate threshold from target / non-target trials.
- Naturalness: DNSMOS P.835 (SIG, BAK, OVRL) and P.808 (the model lives in `cloak.models.dnsmos`, re-exported
  here).
- Imperceptibility: PESQ (ITU-T P.862.2 wide-band via `pesq`), STOI (`pystoi`), SNR, MCD.
- 95 % percentile-bootstrap confidence intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..audio import to_rate
from ..models.dnsmos import DNSMOS, dnsmos_model_paths

PESQ_RATE = 16_000
PESQ_MAX = 4.644  # P.862.2 wide-band MOS-LQO of a signal against itself


# --------------------------------------------------------------------------------------------- helpers


def _finite(values: Sequence[float | None]) -> np.ndarray:
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return a[np.isfinite(a)]


# ------------------------------------------------------------------------------------------ statistics


def bootstrap_ci(values: Sequence[float | None], stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of `stat` over the items (None / NaN dropped). One item gives a zero-width interval,
    none gives (None, None)."""
    a = _finite(values)
    if a.size == 0:
        return None, None
    if a.size == 1 or n_boot < 1:
        v = float(stat(a))
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    stats = np.array([stat(a[i]) for i in idx]) if stat is not np.mean else a[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(values: Sequence[float | None], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{mean, ci95: [lo, hi], n} of the finite values (mean None when there are none)."""
    a = _finite(values)
    lo, hi = bootstrap_ci(a, n_boot=n_boot, seed=seed)
    return {"mean": float(a.mean()) if a.size else None, "ci95": [lo, hi], "n": int(a.size)}


@dataclass(frozen=True)
class EER:
    eer: float  # equal error rate (fraction)
    threshold: float  # accept when score >= threshold
    n_target: int
    n_nontarget: int
    far_at_threshold: float
    frr_at_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compute_eer(target: Sequence[float], nontarget: Sequence[float]) -> EER:
    """EER and its threshold. Accept rule: score >= threshold. FRR(t) = P(target < t), FAR(t) = P(non-target >= t),
    evaluated at every observed score; the EER is where the two curves cross (linear interpolation between the
    two surrounding candidate thresholds), the threshold the midpoint there."""
    tar = np.sort(_finite(target))
    non = np.sort(_finite(nontarget))
    if tar.size == 0 or non.size == 0:
        raise ValueError("EER needs at least one target and one non-target score")
    cand = np.unique(np.concatenate([tar, non, [np.inf]]))
    frr = np.searchsorted(tar, cand, side="left") / tar.size  # targets below t are rejected
    far = 1.0 - np.searchsorted(non, cand, side="left") / non.size  # non-targets at or above t are accepted
    diff = far - frr  # decreasing in t
    i = int(np.argmax(diff <= 0))  # first candidate where FAR <= FRR
    if i == 0:
        eer, thr = float((far[0] + frr[0]) / 2), float(cand[0])
    else:
        d0, d1 = diff[i - 1], diff[i]
        w = d0 / (d0 - d1) if d0 != d1 else 0.5
        eer = float((1 - w) * (far[i - 1] + frr[i - 1]) / 2 + w * (far[i] + frr[i]) / 2)
        hi = cand[i] if np.isfinite(cand[i]) else cand[i - 1] + 1e-6
        thr = float((cand[i - 1] + hi) / 2)
    far_t = float(np.mean(non >= thr))
    frr_t = float(np.mean(tar < thr))
    return EER(eer, thr, int(tar.size), int(non.size), far_t, frr_t)


# ------------------------------------------------------------------------------------- speaker identity


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def enrollment(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of L2-normalised embeddings, renormalised (the target speaker's voice print)."""
    if len(embeddings) == 0:
        raise ValueError("enrollment needs at least one embedding")
    e = np.stack([np.asarray(v, np.float64) / max(np.linalg.norm(v), 1e-12) for v in embeddings])
    m = e.mean(0)
    return (m / max(np.linalg.norm(m), 1e-12)).astype(np.float32)


class SpeakerEncoder:
    """A named embedding function on 16 kHz mono numpy audio, around a model whose `embed` takes a (1, N) tensor."""

    name: str = "encoder"
    white_box: bool = False  # the cloak optimises against this encoder
    checksum: str | None = None
    fixed_threshold: float | None = None  # a published acceptance threshold (ECAPA: the paper's 0.25)

    def __init__(self, model: Any, device: Any = "cpu", white_box: bool | None = None) -> None:
        self.model = model
        self.device = device
        if white_box is not None:
            self.white_box = white_box
        self.checksum = getattr(model, "checksum", None)

    def prepare(self, wave16k: np.ndarray) -> np.ndarray:
        """The model's expected input (float32); encoders with their own input scaling override this."""
        return np.asarray(wave16k, np.float32)

    def embed(self, wave16k: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            w = torch.from_numpy(np.ascontiguousarray(self.prepare(wave16k)))[None].to(self.device)
            return self.model.embed(w)[0].float().cpu().numpy()


class GE2EEncoder(SpeakerEncoder):
    """GE2E d-vector as DiffVC computes it for its condition (volume-normalised to -30 dBFS, no VAD)."""

    name = "ge2e"
    white_box = True

    def prepare(self, wave16k: np.ndarray) -> np.ndarray:
        from ..models.ge2e import volume_gain

        x = np.asarray(wave16k, np.float32)
        return (x * volume_gain(x)).astype(np.float32)


class WavLMEncoder(SpeakerEncoder):
    """WavLM-SV x-vector (transformers WavLMForXVector) from the bundle's wavlm-sv/ directory."""

    name = "wavlm"


class EcapaEncoder(SpeakerEncoder):
    """The paper's black-box ASV: speechbrain's ECAPA-TDNN (spkrec-ecapa-voxceleb) from the bundle's ecapa/ directory,
    run natively (cloak.models.ecapa); accept at its fixed cosine threshold (0.25), not an EER calibration."""

    name = "ecapa"

    def __init__(self, model: Any, device: Any = "cpu", white_box: bool | None = None) -> None:
        from ..models.ecapa import ECAPA_THRESHOLD

        super().__init__(model, device, white_box)
        self.fixed_threshold = ECAPA_THRESHOLD


class VerifierEncoder(SpeakerEncoder):
    """The shipped black-box verifier (`cloak.models.verifier`): a small ECAPA-TDNN trained on corpus-train only,
    never used by the cloak; accepts at its own EER threshold, calibrated on corpus-train speakers held out from
    its training and shipped with the weights (so an acceptance rate does not depend on the speakers evaluated)."""

    name = "verifier"

    def __init__(self, model: Any, device: Any = "cpu", white_box: bool | None = None) -> None:
        super().__init__(model, device, white_box)
        self.fixed_threshold = model.threshold


# --------------------------------------------------------------------------------- imperceptibility


def snr_db(reference: np.ndarray, processed: np.ndarray) -> float:
    """10 log10(sum x^2 / sum delta^2), delta = processed - reference (same length and rate)."""
    x = np.asarray(reference, np.float64)
    d = np.asarray(processed, np.float64) - x
    return 10 * math.log10(max(float(np.sum(x**2)), 1e-20) / max(float(np.sum(d**2)), 1e-20))


def pesq_wb(reference: np.ndarray, processed: np.ndarray, sr: int) -> float | None:
    """Wide-band PESQ (P.862.2, MOS-LQO 1.04..4.64) at 16 kHz; None when PESQ finds no speech."""
    from pesq import PesqError, pesq

    ref = to_rate(reference, sr, PESQ_RATE).astype(np.float64)
    deg = to_rate(processed, sr, PESQ_RATE).astype(np.float64)
    n = min(ref.size, deg.size)
    try:
        return float(pesq(PESQ_RATE, ref[:n], deg[:n], "wb"))
    except PesqError:
        return None


def stoi(reference: np.ndarray, processed: np.ndarray, sr: int) -> float:
    """Short-time objective intelligibility (Taal et al. 2011, pystoi; resamples to 10 kHz internally)."""
    from pystoi import stoi as _stoi

    ref = np.asarray(reference, np.float64)
    deg = np.asarray(processed, np.float64)
    n = min(ref.size, deg.size)
    return float(_stoi(ref[:n], deg[:n], sr, extended=False))


MCD_RATE = 16_000
MCD_ORDER = 24


@lru_cache(maxsize=4)
def _mcd_basis(sr: int, n_fft: int, n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    import librosa
    from scipy.fft import dct

    fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2, htk=False)
    d = dct(np.eye(n_mels), type=2, norm="ortho", axis=0)
    return fb.astype(np.float64), d


def mel_cepstrum(x: np.ndarray, sr: int, n_mels: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(cepstra (frames, n_mels), frame energies in dB): DCT-II (orthonormal) of the natural-log mel amplitude
    spectrum, 25 ms Hann frames, 10 ms hop, at 16 kHz."""
    import librosa

    y = to_rate(x, sr, MCD_RATE).astype(np.float64)
    n_fft, hop = 400, 160
    spec = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=True)) ** 2
    fb, d = _mcd_basis(MCD_RATE, n_fft, n_mels)
    mel_pow = fb @ spec  # (n_mels, frames)
    log_amp = 0.5 * np.log(np.maximum(mel_pow, 1e-10))
    energy_db = 10 * np.log10(np.maximum(spec.sum(0), 1e-20))
    return (d @ log_amp).T, energy_db


def mcd(reference: np.ndarray, processed: np.ndarray, sr: int, order: int = MCD_ORDER,
        silence_db: float = 40.0) -> float:
    """Mel-cepstral distortion in dB, frame-aligned (no DTW: the inputs are sample-aligned):
    mean over frames of (10 / ln 10) * sqrt(2 * sum_{d=1..order} (c_d - c'_d)^2), c_0 (energy) excluded,
    frames more than `silence_db` below the reference's loudest frame excluded."""
    a, ea = mel_cepstrum(reference, sr)
    b, _ = mel_cepstrum(processed, sr)
    n = min(len(a), len(b))
    a, b, ea = a[:n], b[:n], ea[:n]
    keep = ea >= ea.max() - silence_db if n else np.zeros(0, bool)
    if not keep.any():
        return 0.0
    diff = a[keep, 1:order + 1] - b[keep, 1:order + 1]
    return float(np.mean(10.0 / np.log(10.0) * np.sqrt(2.0 * np.sum(diff**2, axis=1))))


def imperceptibility(reference: np.ndarray, protected: np.ndarray, sr: int) -> dict[str, float | None]:
    """Every cloak-audibility metric of `protected` against `reference` (mono, same rate and length)."""
    ref = np.asarray(reference, np.float32)
    adv = np.asarray(protected, np.float32)
    return {
        "pesq": pesq_wb(ref, adv, sr),
        "stoi": stoi(ref, adv, sr),
        "snr_db": snr_db(ref, adv),
        "mcd_db": mcd(ref, adv, sr),
        "linf": float(np.max(np.abs(adv.astype(np.float64) - ref))) if ref.size else 0.0,
    }


__all__ = ["bootstrap_ci", "summarize", "compute_eer", "EER", "cosine", "enrollment", "SpeakerEncoder",
           "GE2EEncoder", "WavLMEncoder", "VerifierEncoder", "DNSMOS", "dnsmos_model_paths", "snr_db", "pesq_wb",
           "stoi", "mcd",
           "mel_cepstrum", "imperceptibility", "to_rate", "PESQ_MAX"]
