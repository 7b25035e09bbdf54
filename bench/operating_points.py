"""Operating points of the cloak against the embedded attacker: effect on clones vs audibility, per setting.

    OMP_NUM_THREADS=1 python bench/operating_points.py                         # every setting below, resumable
    python bench/operating_points.py --settings default,paper --report          # a subset / rewrite the table

On *tuning* speakers of shared/corpus (not the three validation speakers the evaluation reports on): one 5 s
reference each, protected with each named setting, cloned by the embedded cloak-mini (30 steps) from two
utterances of other speakers of the same sex, the clones scored with GE2E (white-box) and the shipped black-box
verifier against the reference speaker's enrollment (their other utterances) and against the source's; the
protected reference against the clean one with PESQ-WB and SNR. A quick map of where the effect starts, not the
evaluation protocol (`cloak evaluate` is). The tuning speakers were in cloak-mini's training set (only the three
validation speakers were held out). Clones go to 16 kHz with the engine's resampler (`cloak.features.resample`);
`cloak evaluate` uses scipy's polyphase one (`cloak.audio.to_rate`): GE2E scores agree to 1e-4, the verifier's
differ by up to ~0.05 (measured on two clones), so compare figures within one tool, not across. Results are
checkpointed per (setting, reference) into bench/results/operating_points.json; the markdown table goes to
bench/results/operating_points.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloak.audio import read_audio, to_mono
from cloak.bundle import load_models
from cloak.clone import clone
from cloak.config import ProtectConfig
from cloak.corpus import list_speakers
from cloak.evaluate.metrics import pesq_wb
from cloak.evaluate.transforms import TRANSFORMS
from cloak.features import GE2E_RATE, resample
from cloak.models.dnsmos import DNSMOS
from cloak.models.ge2e import volume_gain
from cloak.models.verifier import load_verifier
from cloak.protect import ENGINE_VERSION, protect

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
OUT = ROOT / "bench" / "results" / "operating_points.json"
# tuning references and their same-sex sources: no validation speaker (vctk_p225, librispeech_2414/3080) appears
REFERENCES = {"librispeech_1998": ("librispeech_533", "librispeech_3331"),
              "vctk_p228": ("librispeech_533", "librispeech_3331"),
              "librispeech_2609": ("librispeech_1688", "vctk_p227"),
              "vctk_p226": ("librispeech_1688", "vctk_p227")}
SETTINGS: dict[str, dict[str, Any]] = {
    "clean": {},
    "default": {},
    "lambda_voice 1": {"weights": (1.0, 4.5, 10.0, 0.85, 1.0)},  # the default before engine 7
    "paper": {"preset": "paper"},
    "voice": {"losses": ("voice",)},
    "id": {"losses": ("id",)},
    "id+voice": {"losses": ("id", "voice")},
    "id+voice margin20": {"losses": ("id", "voice"), "masking_margin_db": 20.0},
    "id+voice box": {"losses": ("id", "voice"), "shaping": "none"},
    "id+voice box eps0.004": {"losses": ("id", "voice"), "shaping": "none", "epsilon": 0.004, "step_size": 8e-5},
    "id+voice box eps0.008": {"losses": ("id", "voice"), "shaping": "none", "epsilon": 0.008, "step_size": 1.6e-4},
    "voice box": {"losses": ("voice",), "shaping": "none"},
    "voice margin22": {"losses": ("voice",), "masking_margin_db": 22.0},
    "voice eot": {"losses": ("voice",), "eot": ("mp3", "resample", "gain")},
    "voice eot mp3": {"losses": ("voice",), "eot": ("mp3",)},
    # the masking bound's exponent: 0 = a flat bound at the clip's active speech level (the box made level-relative)
    "voice flat": {"losses": ("voice",), "masking_exponent": 0.0},
    "voice flat margin30": {"losses": ("voice",), "masking_exponent": 0.0, "masking_margin_db": 30.0},
    "voice gamma0.25": {"losses": ("voice",), "masking_exponent": 0.25},
    "voice gamma0.5": {"losses": ("voice",), "masking_exponent": 0.5},  # the fixed default before engine 9
    "default flat": {"masking_exponent": 0.0},
    # a quality target: each window's exponent chosen for its predicted PESQ-WB (cloak.quality)
    "voice quality3.9": {"losses": ("voice",), "quality_target": 3.9},
    "default quality3.9": {"quality_target": 3.9},
}


def config_of(name: str) -> ProtectConfig:
    s = dict(SETTINGS[name])
    preset = s.pop("preset", None)
    return ProtectConfig.preset(preset, **s) if preset else ProtectConfig(**s)


class Scorer:
    def __init__(self) -> None:
        self.models = load_models()
        self.verifier = load_verifier()
        self.dnsmos = DNSMOS(threads=1)
        self.speakers = {s.name: s for s in list_speakers(CORPUS)}

    @torch.no_grad()
    def embed(self, wave: np.ndarray, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), sr, GE2E_RATE)[None]
        return (torch.nn.functional.normalize(self.models.ge2e.embed(w * volume_gain(w))[0], dim=0),
                self.verifier.embed(w)[0])

    def enrollment(self, speaker: str, skip: Path) -> tuple[torch.Tensor, torch.Tensor]:
        embs = [self.embed(to_mono(a.samples), a.sample_rate) for a in
                (read_audio(f) for f in self.speakers[speaker].files if f != skip)]
        return tuple(torch.nn.functional.normalize(torch.stack([e[i] for e in embs]).mean(0), dim=0)
                     for i in (0, 1))  # type: ignore[return-value]

    def run(self, setting: str, reference: str, transform: str | None = None) -> dict[str, Any]:
        ref_file = self.speakers[reference].files[0]
        audio = read_audio(ref_file)
        x = to_mono(audio.samples)[: 5 * audio.sample_rate]
        t0 = time.perf_counter()
        y = x if setting == "clean" else protect(x, audio.sample_rate, self.models, config_of(setting)).audio
        seconds = time.perf_counter() - t0
        received = y if transform is None else TRANSFORMS[transform](y, audio.sample_rate)
        enroll_ref = self.enrollment(reference, ref_file)
        clones = []
        for source in REFERENCES[reference]:
            src_file = self.speakers[source].files[1]
            s = read_audio(src_file)
            c = clone(s.samples, s.sample_rate, received, audio.sample_rate, self.models, steps=30, seed=0)
            ge2e, ver = self.embed(c.audio, c.sample_rate)
            enroll_src = self.enrollment(source, src_file)
            clones.append({"source": source, "ge2e_ref": float(ge2e @ enroll_ref[0]),
                           "ge2e_src": float(ge2e @ enroll_src[0]), "ver_ref": float(ver @ enroll_ref[1]),
                           "ver_src": float(ver @ enroll_src[1]), "ovrl": self.dnsmos(c.audio, c.sample_rate)["ovrl"]})
        diff = float(np.sum((y.astype(np.float64) - x) ** 2))
        return {"setting": setting, "reference": reference, "transform": transform, "protect_seconds": seconds,
                "clones": clones,
                "snr_db": 10 * math.log10(float(np.sum(x.astype(np.float64) ** 2)) / max(diff, 1e-20)),
                "pesq_wb": None if setting == "clean" else pesq_wb(x, y, audio.sample_rate)}


def table(record: dict[str, Any], transform: str | None = None) -> str:
    """The table of the clones made from references that went through `transform` (None: as delivered); the
    clean rows are the clean references through the same transform."""
    rows = [r for r in record["rows"] if r.get("transform") == transform]
    threshold = record["verifier_threshold"]
    clean = {r["reference"]: r for r in rows if r["setting"] == "clean"}
    out = ["| setting | refs | GE2E clone→speaker | Δ | verifier clone→speaker | Δ | verifier accepts | clone closer "
           "to speaker than source (GE2E) | DNSMOS OVRL | PESQ-WB | SNR dB | s / 5 s clip |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name and r["reference"] in clean]
        if not mine or name == "clean":
            continue
        p = [c for r in mine for c in r["clones"]]
        c0 = [c for r in mine for c in clean[r["reference"]]["clones"]]

        def mean(items: list[dict[str, Any]], key: str) -> float:
            return float(np.mean([i[key] for i in items]))
        accept = 100 * float(np.mean([i["ver_ref"] >= threshold for i in p]))
        accept0 = 100 * float(np.mean([i["ver_ref"] >= threshold for i in c0]))
        closer = 100 * float(np.mean([i["ge2e_ref"] > i["ge2e_src"] for i in p]))
        closer0 = 100 * float(np.mean([i["ge2e_ref"] > i["ge2e_src"] for i in c0]))
        out.append(f"| {name} | {len(mine)} | {mean(p, 'ge2e_ref'):.3f} "
                   f"| {mean(p, 'ge2e_ref') - mean(c0, 'ge2e_ref'):+.3f} "
                   f"| {mean(p, 'ver_ref'):.3f} | {mean(p, 'ver_ref') - mean(c0, 'ver_ref'):+.3f} "
                   f"| {accept:.0f} % (clean {accept0:.0f} %) | {closer:.0f} % (clean {closer0:.0f} %) "
                   f"| {mean(p, 'ovrl'):.2f} (clean {mean(c0, 'ovrl'):.2f}) "
                   f"| {np.mean([r['pesq_wb'] for r in mine]):.2f} | {np.mean([r['snr_db'] for r in mine]):.1f} "
                   f"| {np.mean([r['protect_seconds'] for r in mine]):.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names (default all)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default=None,
                   help="clone from the protected (and clean) references after this transform, e.g. mp3_64")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown table from the JSON")
    a = p.parse_args()
    out = Path(a.out)
    record: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if not a.report:
        names = [n.strip() for n in a.settings.split(",") if n.strip()]
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            raise SystemExit(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
        scorer = Scorer()
        record.update({"engine": ENGINE_VERSION, "model": scorer.models.diffvc_id, "precision": scorer.models.precision,
                       "machine": platform.processor() or platform.machine(),
                       "verifier_threshold": scorer.verifier.threshold})
        done = {(r["setting"], r["reference"], r.get("transform")) for r in record["rows"]}
        for name in ["clean", *[n for n in names if n != "clean"]]:
            for ref in REFERENCES:
                if (name, ref, a.transform) in done:
                    continue
                row = scorer.run(name, ref, a.transform)
                row["created"] = datetime.now(UTC).isoformat(timespec="seconds")
                record["rows"].append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(record, indent=1))
                print(f"{name:28} {ref:18} PESQ {row['pesq_wb'] or 0:.2f} SNR {row['snr_db']:.1f} "
                      + " ".join(f"ver {c['ver_ref']:.3f} ge2e {c['ge2e_ref']:.3f}" for c in row["clones"]), flush=True)
    md = out.with_suffix(".md")
    transforms = sorted({r.get("transform") for r in record["rows"]} - {None})
    note = f"{record['note']}\n\n" if record.get("note") else ""
    sections = "".join(f"\n## References through {t} before cloning ({TRANSFORMS[t].description})\n\n"
                       + table(record, t) for t in transforms)
    md.write_text("# Operating points against the embedded attacker (tuning speakers)\n\n" + note + table(record)
                  + sections)
    print(md.read_text())


if __name__ == "__main__":
    main()
