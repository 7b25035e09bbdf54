"""report.md: a `cloak evaluate` report (cloak.evaluate.report) rendered as Markdown tables like the paper's."""

from __future__ import annotations

from typing import Any


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
