"""`python -m bench` (from the repository root): every CPU speed figure side by side, on this machine, in one run.

    python -m bench                 # start-up, fp32 vs bf16 (where native) on 7 s and 60 s, engine vs naive loop
    python -m bench --quick         # 7 s only, 2 iterations, 1 start-up run: a look in a few minutes

In order: `bench/startup.py` (fresh processes: imports and model loading cannot be timed in a warm one), then, in
this process, `bench/speed.py` (the engine on the embedded cloak-mini, the paper's settings at a few iterations per
window, extrapolated to 50; fp32 and, where the CPU has native bf16, bf16; 7 s and 60 s of the shipped sample, the
60 s case checked for linear cost) and `bench/engine_vs_naive.py` (the engine vs the naive reference loop, same
seed and draws). Each writes its JSON in bench/results/; this writes bench/results/bench.json and bench.md: one
table with the CPU model, core count and the goals each figure is held to. Other processes on the cores change
every figure: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))  # engine_vs_naive imports its sibling naive.py as a script would

import engine_vs_naive  # noqa: E402
import speed  # noqa: E402
import startup  # noqa: E402

from cloak.cpu import cpu_bf16_flags, cpu_cores, cpu_model  # noqa: E402

GOALS = {"start-up": 3.0, "paper_bf16_7s": 40.0, "paper_fp32_7s": 100.0, "bf16_gain": 1.6, "engine_vs_naive": 3.0}


def summary(start: dict, spd: dict, naive: dict) -> tuple[dict, str]:
    """The headline figures of the three benches and the markdown table of them."""
    by = {(c["precision"], c["seconds"]): c for c in spd["cases"] if c["threads"] == spd["cases"][0]["threads"]}
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, goal: str = "") -> None:
        rows.append((what, value, goal))

    before = start["before_first_iteration_s"]
    row(f"start-up before the first iteration ({start['precision']}, {start['clip_seconds']:g} s clip)",
        f"{before:.2f} s", f"≤ {GOALS['start-up']:g} s: {'met' if before <= GOALS['start-up'] else 'not met'}")
    med = start["median_s"]
    row("… of which imports / load_models / first window's set-up",
        f"{med['import torch'] + med['import clients.cli (cloak, numpy, soundfile)']:.2f} / "
        f"{med['load_models (total)']:.2f} / {med['first window set-up (prepare)']:.2f} s")
    for (prec, secs), c in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        goal = ""
        if secs == 7.0 and prec in ("fp32", "bf16"):
            limit = GOALS[f"paper_{prec}_7s"] if prec == "bf16" or not spd["native_bf16"] else None
            if limit is not None:
                ok = c["paper_settings_estimate_s"] <= limit
                goal = f"≤ {limit:g} s: {'met' if ok else 'not met'}"
        lin = "" if "linear_ok" not in c else \
            f"; linear: {'yes' if c['linear_ok'] else 'NO'} (≤ {c['linear_bound_s']:.0f} s)"
        row(f"{secs:g} s clip, {prec}: s / iteration, set-up / window, paper settings (extrapolated)",
            f"{c['iteration_s']:.2f} s, {c['setup_per_window_s']:.1f} s, {c['paper_settings_estimate_s']:.0f} s{lin}",
            goal)
    for secs in sorted({s for _, s in by}):
        if ("fp32", secs) in by and ("bf16", secs) in by:
            gain = by[("fp32", secs)]["iteration_s"] / by[("bf16", secs)]["iteration_s"]
            row(f"bf16 vs fp32 per iteration, {secs:g} s clip", f"{gain:.2f}×",
                f"≥ {GOALS['bf16_gain']:g}×: {'met' if gain >= GOALS['bf16_gain'] else 'not met'}")
    row(f"engine vs naive loop ({naive['clip_seconds']:g} s, {naive['settings']['iterations']} iterations, "
        f"{naive['threads']} thread(s)): loop / total",
        f"{naive['speedup_loop']:.2f}× / {naive['speedup_total']:.2f}×",
        f"≥ {GOALS['engine_vs_naive']:g}×: {'met' if naive['speedup_loop'] >= GOALS['engine_vs_naive'] else 'not met'}")
    head = (f"{spd['cpu']}, {spd['cores']} cores, native bf16: {', '.join(spd['native_bf16']) or 'none'}; "
            f"torch {spd['torch']}; load average {spd['load_average_before'][0]:.2f} before, "
            f"{spd['load_average_after'][0]:.2f} after the speed cases; {spd['settings']}")
    md = "\n".join([f"# `python -m bench` ({datetime.now(UTC).date()})", "", head, "",
                    "| figure | measured | goal |", "|---|---|---|",
                    *(f"| {w} | {v} | {g} |" for w, v, g in rows)]) + "\n"
    data = {"bench": "all", "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": cpu_cores(), "native_bf16": list(cpu_bf16_flags()), "load_average_end": os.getloadavg(),
            "rows": [{"figure": w, "measured": v, "goal": g} for w, v, g in rows],
            "startup": start, "speed": spd, "engine_vs_naive": naive}
    return data, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="7 s only, 2 iterations, one start-up run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every case (default 1)")
    p.add_argument("--out", help="folder for the JSON and markdown (default bench/results, with --quick "
                   "bench/results/quick, so that a quick look leaves the full run's figures alone)")
    p.add_argument("--report", action="store_true", help="only rewrite bench.json/bench.md from the three JSONs there")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else RESULTS / "quick" if a.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    t = str(a.threads)
    if not a.report:
        run_all(a.quick, t, out)
    data, md = summary(*(json.loads((out / f"{n}.json").read_text()) for n in ("startup", "speed", "engine_vs_naive")))
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench.md").write_text(md)
    print("\n" + md)


def run_all(quick: bool, t: str, out: Path) -> None:
    """The three benches, each writing its JSON into `out`."""
    startup.main(["--runs", "1" if quick else "2", "--threads", t, "--out", str(out / "startup.json")])
    speed.main(["--seconds", *(["7"] if quick else ["7", "60"]), "--threads", t,
                "--iterations", "2" if quick else "4", "--out", str(out / "speed.json")])
    engine_vs_naive.main(["--seconds", "3", "--iterations", "2" if quick else "5", "--threads", t,
                          "--out", str(out / "engine_vs_naive.json")])


if __name__ == "__main__":
    main()
