"""Acceptance figures of a trained DiffVC (issue: the embedded cloak-mini must really clone).

On the unseen validation speakers, every ordered (source speaker, reference speaker) pair of different speakers,
a few utterance pairs each, with the real GE2E (enrollment = mean d-vector of the speaker's other utterances):
  * closer_rate: fraction of clones closer to the reference speaker than to the source speaker;
  * mean cos(clone, reference speaker) vs mean cos(clean source, reference speaker) (criterion: +0.15);
  * clone_vs_clone_same_source: GE2E cosine between clones of one source made with different references
    (criterion <= 0.85: different references give different voices);
  * DNSMOS OVRL of the clones vs the real sources (criterion: no more than 0.5 below);
and the encoder's identity removal: GE2E similarity between vocoded encoder outputs ("average voice") of
different speakers, compared with that of the original utterances.

    python -m cloak.train.acceptance [--models DIR] [--pairs 2] [--steps 30] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio import read_audio, to_mono
from ..bundle import Models, load_models
from ..clone import clone
from ..corpus import list_speakers
from ..features import DIFFVC_RATE, GE2E_RATE, diffvc_mel, resample
from ..models.ge2e import volume_gain
from .mini import VAL_SPEAKERS

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def embed_wave(models: Models, wave: np.ndarray, rate: int) -> torch.Tensor:
    w16 = resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), rate, GE2E_RATE)[None]
    with torch.no_grad():
        return models.ge2e.embed(w16 * volume_gain(w16))[0]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def enrollment(embs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=0)


def clone_pair_scores(models: Models, src_file: Path, ref_file: Path, enroll_src: torch.Tensor,
                      enroll_ref: torch.Tensor, steps: int = 30, seed: int = 0,
                      dnsmos: Any = None, embeddings: list[torch.Tensor] | None = None) -> dict[str, float]:
    """GE2E cosines of one clone; the clone's embedding is appended to `embeddings` when given."""
    src, ref = read_audio(src_file), read_audio(ref_file)
    out = clone(src.samples, src.sample_rate, ref.samples, ref.sample_rate, models, steps=steps, seed=seed)
    e_clone = embed_wave(models, out.audio, out.sample_rate)
    e_src = embed_wave(models, to_mono(src.samples), src.sample_rate)
    if embeddings is not None:
        embeddings.append(e_clone)
    scores = {"clone_vs_ref": _cos(e_clone, enroll_ref), "clone_vs_src": _cos(e_clone, enroll_src),
              "source_vs_ref": _cos(e_src, enroll_ref)}
    if dnsmos is not None:
        scores["dnsmos_ovrl_clone"] = dnsmos(out.audio, out.sample_rate)["ovrl"]
        scores["dnsmos_ovrl_source"] = dnsmos(to_mono(src.samples), src.sample_rate)["ovrl"]
    return scores


def run(models: Models, corpus: Path = CORPUS, pairs_per_speaker_pair: int = 2, steps: int = 30) -> dict:
    try:
        from ..models.dnsmos import DNSMOS

        dnsmos: Any = DNSMOS()
    except (ImportError, FileNotFoundError):  # speechmos / onnxruntime not installed: no naturalness figure
        dnsmos = None
    speakers = {s.name: s for s in list_speakers(corpus) if s.name in VAL_SPEAKERS}
    files = {n: s.files for n, s in speakers.items()}
    rows = []
    clones_of: dict[str, list[torch.Tensor]] = {}  # source file -> embeddings of its clones (one per reference)
    for a, b in itertools.permutations(sorted(speakers), 2):
        for k in range(pairs_per_speaker_pair):
            src_f, ref_f = files[a][k], files[b][k]
            enroll_a = enrollment([embed_wave(models, to_mono(read_audio(f).samples), read_audio(f).sample_rate)
                                for f in files[a] if f != src_f])
            enroll_b = enrollment([embed_wave(models, to_mono(read_audio(f).samples), read_audio(f).sample_rate)
                                for f in files[b] if f != ref_f])
            s = clone_pair_scores(models, src_f, ref_f, enroll_a, enroll_b, steps, dnsmos=dnsmos,
                                  embeddings=clones_of.setdefault(str(src_f), []))
            rows.append({"source": str(src_f.name), "reference": str(ref_f.name), "source_speaker": a,
                         "reference_speaker": b, **s})
    closer = float(np.mean([r["clone_vs_ref"] > r["clone_vs_src"] for r in rows]))
    gain = float(np.mean([r["clone_vs_ref"] for r in rows]) - np.mean([r["source_vs_ref"] for r in rows]))
    mean_ref = float(np.mean([r["clone_vs_ref"] for r in rows]))
    # does the reference matter at all? GE2E cosine between clones of one source made with different references
    # (1.0 = the model ignores its reference; real utterances of different speakers here: ~0.5-0.6)
    same_source = [_cos(x, y) for es in clones_of.values() for i, x in enumerate(es) for y in es[i + 1:]]
    vs_clone = float(np.mean(same_source)) if same_source else None
    ovrl_clones, ovrl_sources = _mean_of(rows, "dnsmos_ovrl_clone"), _mean_of(rows, "dnsmos_ovrl_source")
    criteria = {"closer_rate>=0.8": closer >= 0.8, "gain>=0.15": gain >= 0.15,
                "clone_vs_clone<=0.85": vs_clone is not None and vs_clone <= 0.85}
    if ovrl_clones is not None and ovrl_sources is not None:
        criteria["dnsmos_clones>=sources-0.5"] = ovrl_clones >= ovrl_sources - 0.5
    return {"clone_vs_clone_same_source": vs_clone,
            "pairs": rows, "closer_rate": closer, "mean_clone_vs_ref": mean_ref,
            "mean_source_vs_ref": float(np.mean([r["source_vs_ref"] for r in rows])), "similarity_gain": gain,
            "criteria": criteria, "dnsmos_ovrl_clones": ovrl_clones, "dnsmos_ovrl_sources": ovrl_sources}


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else None


@torch.no_grad()
def encoder_identity_removal(models: Models, corpus: Path = CORPUS, per_speaker: int = 2) -> dict[str, float]:
    """Mean GE2E cosine between different speakers: original utterances vs vocoded encoder outputs; and the
    same-speaker mean of the originals for reference."""
    voc = models.vocoder()
    orig: dict[str, list[torch.Tensor]] = {}
    avg: dict[str, list[torch.Tensor]] = {}
    for spk in list_speakers(corpus):
        if spk.name not in VAL_SPEAKERS:
            continue
        for f in spk.files[:per_speaker]:
            a = read_audio(f)
            w22 = resample(torch.from_numpy(to_mono(a.samples)), a.sample_rate, DIFFVC_RATE)[None]
            mel = diffvc_mel(w22)
            mean = models.diffvc.average_voice(mel, torch.ones(1, 1, mel.shape[-1]))
            orig.setdefault(spk.name, []).append(embed_wave(models, voc(mel)[0].numpy(), DIFFVC_RATE))
            avg.setdefault(spk.name, []).append(embed_wave(models, voc(mean)[0].numpy(), DIFFVC_RATE))

    def mean_cos(d: dict[str, list[torch.Tensor]], same: bool) -> float:
        vals = []
        names = sorted(d)
        for i, a in enumerate(names):
            for b in names[i:]:
                if (a == b) != same:
                    continue
                for x in d[a]:
                    for y in d[b]:
                        if x is not y:
                            vals.append(_cos(x, y))
        return float(np.mean(vals))

    return {"different_speakers_original": mean_cos(orig, False), "different_speakers_encoder": mean_cos(avg, False),
            "same_speaker_original": mean_cos(orig, True), "same_speaker_encoder": mean_cos(avg, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    models = load_models(a.models)
    res = run(models, Path(a.corpus), a.pairs, a.steps)
    res["encoder"] = encoder_identity_removal(models, Path(a.corpus))
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
