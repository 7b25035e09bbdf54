"""ASV thresholds of a run: the EER on clean leave-one-out enrollment trials of the evaluated speaker set."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import metrics as M


def calibrate(encoders: list[str], emb: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """EER threshold per encoder from clean trials: each utterance against the leave-one-out enrollment of its own
    speaker (target) and against the enrollment of every other speaker (non-target).
    `emb` = {speaker: {file: {encoder: embedding}}}."""
    result: dict[str, Any] = {}
    for name in encoders:
        per_spk = {s: [v[name] for v in files.values()] for s, files in emb.items() if files}
        tar: list[float] = []
        non: list[float] = []
        full = {s: M.enrollment(v) for s, v in per_spk.items()}
        for s, vecs in per_spk.items():
            for i, v in enumerate(vecs):
                if len(vecs) > 1:
                    tar.append(M.cosine(v, M.enrollment([w for j, w in enumerate(vecs) if j != i])))
                non.extend(M.cosine(v, full[t]) for t in per_spk if t != s)
        entry: dict[str, Any] = {"trial": "utterance vs leave-one-out enrollment (mean of L2-normalised "
                                          "embeddings of the speaker's other clean files)",
                                 "speakers": len(per_spk), "files": sum(len(v) for v in per_spk.values()),
                                 "target_scores": summarize_plain(tar), "nontarget_scores": summarize_plain(non),
                                 "target": tar, "nontarget": non}
        if tar and non:
            entry.update(M.compute_eer(tar, non).to_dict())
        else:
            entry.update({"eer": None, "threshold": None,
                          "reason": "needs >= 2 speakers and a speaker with >= 2 files"})
        result[name] = entry
    return result


def summarize_plain(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}
