"""Time and peak memory of `cloak protect` at the defaults, as a user runs it, for a 7 s and a 60 s clip.

    python bench/footprint.py                      # both clips, --threads 1, JSON + markdown in bench/results/
    python bench/footprint.py --seconds 7 --threads 2

Each clip is corpus speech (LibriSpeech speaker 1688, its files joined in order) at 44.1 kHz stereo, 16-bit
WAV, scaled to -26 dBFS active speech level. Each run is a fresh `cloak protect IN -o OUT --threads N`
process (imports, model loading, protection and writing included); its wall time and peak resident memory
(ru_maxrss from wait4, the process alone) are recorded, with the CPU as `cloak info` names it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

from cloak.evaluate.metrics import to_rate
from cloak.perceptual import scale_to_level
from cloak.protect import ENGINE_VERSION

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
RESULTS = ROOT / "bench" / "results"
RATE = 44_100


def make_clip(seconds: float, path: Path) -> None:
    parts, sr = [], 16_000
    for f in sorted((CORPUS / "librispeech_1688").iterdir()):
        x, sr = sf.read(str(f), dtype="float32")
        parts.append(x)
        if sum(map(len, parts)) >= seconds * sr:
            break
    x = to_rate(np.concatenate(parts)[: int(seconds * sr)], sr, RATE)
    stereo = scale_to_level(np.stack([x, x], axis=1), RATE, -26.0)
    sf.write(str(path), stereo, RATE, subtype="PCM_16")


def cloak_exe() -> str:
    exe = Path(sys.executable).with_name("cloak")
    return str(exe) if exe.exists() else "cloak"


def cpu_line() -> str:
    out = subprocess.run([cloak_exe(), "info"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^cpu: (.*?);", out, re.M)
    return m.group(1) if m else "unknown"


def run_one(clip: Path, out: Path, threads: int, iterations: int | None) -> dict[str, float]:
    more = [] if iterations is None else ["--iterations", str(iterations)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([cloak_exe(), "protect", str(clip), "-o", str(out), "--threads", str(threads), "--force",
                             *more], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"cloak protect failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0, "cpu_s": usage.ru_utime + usage.ru_stime}


def write_table(data: dict, out: Path) -> str:
    """The markdown table beside the JSON (and returned): one row per clip length and thread count."""
    lines = ["| CPU | clip (44.1 kHz stereo) | iterations | threads | time | CPU time | peak memory (RSS) | engine |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    rows = sorted(data["rows"].values(), key=lambda r: (r["engine"].split(":")[0], r["seconds"], r["threads"]))
    for r in rows:
        lines.append(f"| {r.get('cpu', data.get('cpu', '?'))} | {r['seconds']:g} s | {r.get('iterations') or 50} | "
                     f"{r['threads']} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['peak_rss_mib'] / 1024:.2f} GiB "
                     f"| {r['engine'].split(':')[0]} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", nargs="+", type=float, default=[7.0, 60.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, help="fewer PGD iterations than the default 50 (peak memory is reached "
                   "in a window's first step; time is then not the default run's)")
    p.add_argument("--out", default=str(RESULTS / "footprint.json"))
    p.add_argument("--report", action="store_true", help="only rewrite the markdown table from the JSON")
    args = p.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    if args.report:
        print(write_table(data, out))
        return
    cpu = cpu_line()
    data["what"] = ("`cloak protect` at the defaults in a fresh process: wall time and peak RSS, 44.1 kHz stereo "
                    "16-bit WAV, -26 dBFS active speech level")
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            clip = Path(tmp) / f"clip{seconds:g}.wav"
            make_clip(seconds, clip)
            row = {"seconds": seconds, "threads": args.threads, "iterations": args.iterations, "cpu": cpu,
                   **run_one(clip, Path(tmp) / "out.wav", args.threads, args.iterations),
                   "engine": ENGINE_VERSION, "date": datetime.now(UTC).isoformat(timespec="seconds")}
            key = f"{cpu}|{seconds:g}s-{args.threads}t-{args.iterations or 50}i-e{ENGINE_VERSION.split(':')[0]}"
            data["rows"][key] = row
            out.write_text(json.dumps(data, indent=1) + "\n")
            print(f"{seconds:g} s, {args.threads} thread(s): {row['wall_s']:.0f} s, peak RSS "
                  f"{row['peak_rss_mib']:.0f} MiB", flush=True)
    print(write_table(data, out))

if __name__ == "__main__":
    main()
