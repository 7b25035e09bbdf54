"""What the embedded attacker's voice depends on, and how far the cloak reaches it.

    OMP_NUM_THREADS=1 python bench/prior_reach.py sensitivity        # clones with the prior's inputs moved by hand
    python bench/prior_reach.py reach --protected DIR                # clean vs protected references of `cloak evaluate`

cloak-mini's decoder takes a clone's voice from its speaker-adaptive prior (cloak.models.prior), which reads the
reference only through utterance-level statistics: the liftered log-mel mean and spread over voiced frames, and the
F0 mean and spread it predicts from those and the GE2E d-vector. Two measurements put the cloak's effect in scale:

sensitivity  one clean 5 s reference per tuning speaker (not the validation speakers), a same-sex source; the
             reference's condition is moved by hand (envelope spread x e^0.1 / e^0.3 / e^-0.3, envelope mean +0.1 /
             +0.5 nats in the upper 30 bands or along a fixed random direction, F0 spread x2 / x4, F0 mean +0.18 /
             +0.5 log-Hz, the FiLM vector plus noise of its own scale) and the clone is scored: shipped verifier
             cosine to the speaker's enrollment (its other utterances) and DNSMOS OVRL.
reach        the same quantities computed on clean and protected references (the `protected.wav` files that
             `cloak evaluate` caches under OUT/cache/cloak-*/SPEAKER/UTTERANCE/, with their `protected.json`):
             mean absolute change of the predicted F0 mean and log spread, of the envelope mean and log spread, and
             the d-vector's cosine to the clean one.
Rows are written to bench/results/prior_reach.json as they come (a stopped run resumes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloak.audio import read_audio, to_mono
from cloak.bundle import Models, load_models
from cloak.clone import LOG_FLOOR_NAT, mel_spectral_subtraction, reference_embedding
from cloak.corpus import list_speakers
from cloak.evaluate import metrics as M
from cloak.features import DIFFVC_RATE, diffvc_mel, resample
from cloak.models.dnsmos import DNSMOS
from cloak.models.prior import SpeakerCondition
from cloak.models.verifier import load_verifier
from cloak.pitch import f0_contour

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
OUT = ROOT / "bench" / "results" / "prior_reach.json"
PAIRS = (("librispeech_1998", "librispeech_533"), ("vctk_p226", "librispeech_1688"))  # tuning speakers only


def moved(s: SpeakerCondition, **changes: torch.Tensor) -> SpeakerCondition:
    fields = {"cond": s.cond, "env_mean": s.env_mean, "env_std": s.env_std, "f0_mean": s.f0_mean,
              "f0_std": s.f0_std}
    return SpeakerCondition(**{**fields, **changes})


def manipulations() -> dict[str, Callable[[SpeakerCondition], SpeakerCondition]]:
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(80, generator=g)
    upper = torch.zeros(80)
    upper[50:] = 1.0
    noise = torch.randn(128, generator=g)
    return {
        "none": lambda s: s,
        "env spread x e^0.1": lambda s: moved(s, env_std=s.env_std * np.exp(0.1)),
        "env spread x e^0.3": lambda s: moved(s, env_std=s.env_std * np.exp(0.3)),
        "env spread x e^-0.3": lambda s: moved(s, env_std=s.env_std * np.exp(-0.3)),
        "env mean +0.1 upper": lambda s: moved(s, env_mean=s.env_mean + 0.1 * upper),
        "env mean +0.5 upper": lambda s: moved(s, env_mean=s.env_mean + 0.5 * upper),
        "env mean +0.1 random": lambda s: moved(s, env_mean=s.env_mean + 0.1 * rnd),
        "env mean +0.3 random": lambda s: moved(s, env_mean=s.env_mean + 0.3 * rnd),
        "F0 spread x2": lambda s: moved(s, f0_std=s.f0_std * 2),
        "F0 spread x4": lambda s: moved(s, f0_std=s.f0_std * 4),
        "F0 mean +0.18": lambda s: moved(s, f0_mean=s.f0_mean + 0.18),
        "F0 mean +0.5": lambda s: moved(s, f0_mean=s.f0_mean + 0.5),
        "FiLM vector + noise": lambda s: moved(s, cond=s.cond + noise[: s.cond.shape[-1]] * s.cond.std()),
    }


class Scorer:
    def __init__(self) -> None:
        self.models: Models = load_models(precision="fp32")
        self.verifier = M.VerifierEncoder(load_verifier())
        self.dnsmos = DNSMOS(threads=1)
        self.speakers = {s.name: s for s in list_speakers(CORPUS)}

    def embed(self, wave: np.ndarray, sr: int) -> np.ndarray:
        """The verifier's embedding as `cloak evaluate` scores it (its resampler, its encoder wrapper)."""
        return self.verifier.embed(M.to_rate(wave, sr, 16_000))

    def enrollment(self, name: str, skip: Path) -> np.ndarray:
        return M.enrollment([self.embed(to_mono(a.samples), a.sample_rate)
                             for a in (read_audio(f) for f in self.speakers[name].files if f != skip)])

    def condition(self, wave: np.ndarray, sr: int) -> tuple[SpeakerCondition, torch.Tensor, torch.Tensor]:
        w22 = resample(torch.from_numpy(np.ascontiguousarray(wave, np.float32)), sr, DIFFVC_RATE)[None]
        mel = diffvc_mel(w22)
        c = reference_embedding(self.models, w22)
        assert self.models.prior is not None
        return self.models.prior.condition(c, mel, torch.ones_like(mel[:, :1])), mel, c

    @torch.no_grad()
    def sensitivity(self, reference: str, source: str) -> list[dict[str, Any]]:
        m = self.models
        assert m.prior is not None
        ref_file = self.speakers[reference].files[0]
        a = read_audio(ref_file)
        base, ref_mel, c = self.condition(to_mono(a.samples)[: 5 * a.sample_rate], a.sample_rate)
        s = read_audio(self.speakers[source].files[1])
        src = resample(torch.from_numpy(to_mono(s.samples)), s.sample_rate, DIFFVC_RATE)
        src_mel = diffvc_mel(src[None])
        log_f0, voiced = f0_contour(src.numpy(), DIFFVC_RATE, src_mel.shape[-1])
        pitch = torch.from_numpy(log_f0)[None, None], torch.from_numpy(voiced)[None, None].float()
        mask = torch.ones_like(src_mel[:, :1])
        avg = m.diffvc.average_voice(src_mel, mask)
        enroll = self.enrollment(reference, ref_file)
        rows = []
        for name, change in manipulations().items():
            mean = m.prior.convert_mean(avg, mask, pitch[0], pitch[1], change(base))
            mel = m.diffvc.convert(src_mel, torch.tensor([src_mel.shape[-1]]), ref_mel,
                                   torch.tensor([ref_mel.shape[-1]]), c, 30, "ml",
                                   generator=torch.Generator().manual_seed(0), mean=mean)
            out = np.clip(mel[0].numpy(), LOG_FLOOR_NAT, 10.0)
            wave = m.vocoder()(torch.from_numpy(mel_spectral_subtraction(out, out))[None])[0].numpy()
            rows.append({"kind": "sensitivity", "reference": reference, "source": source, "change": name,
                         "verifier": M.cosine(self.embed(wave, DIFFVC_RATE), enroll),
                         "ovrl": self.dnsmos(wave, DIFFVC_RATE)["ovrl"]})
            print(rows[-1], flush=True)
        return rows

    @torch.no_grad()
    def reach(self, item: Path) -> dict[str, Any]:
        meta = json.loads((item / "protected.json").read_text())
        clean, protected = read_audio(meta["file"]), read_audio(item / "protected.wav")
        x, y = to_mono(clean.samples), to_mono(protected.samples)
        n = min(len(x), len(y))
        (s0, _, c0), (s1, _, c1) = (self.condition(w[:n], clean.sample_rate) for w in (x, y))
        return {"kind": "reach", "item": str(item), "speaker": meta["speaker"], "file": Path(meta["file"]).name,
                "losses": sorted(meta["losses_end"]),
                "f0_mean": float(s1.f0_mean - s0.f0_mean), "f0_log_spread": float(torch.log(s1.f0_std / s0.f0_std)),
                "env_mean": float((s1.env_mean - s0.env_mean).abs().mean()),
                "env_log_spread": float(torch.log(s1.env_std / s0.env_std).abs().mean()),
                "dvector_cos": float(torch.nn.functional.cosine_similarity(c0, c1))}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sens = [r for r in rows if r["kind"] == "sensitivity"]
    for ref in sorted({r["reference"] for r in sens}):
        mine = {r["change"]: r for r in sens if r["reference"] == ref}
        if "none" in mine:
            out[ref] = {k: {"verifier_delta": round(r["verifier"] - mine["none"]["verifier"], 3),
                            "ovrl_delta": round(r["ovrl"] - mine["none"]["ovrl"], 2)} for k, r in mine.items()}
    reach = [r for r in rows if r["kind"] == "reach"]
    if reach:
        out["reach (mean |change| over protected references)"] = {
            k: round(float(np.mean([abs(r[k]) for r in reach])), 3)
            for k in ("f0_mean", "f0_log_spread", "env_mean", "env_log_spread")} | {
            "dvector_cos": round(float(np.mean([r["dvector_cos"] for r in reach])), 4), "n": len(reach)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("sensitivity", "reach"))
    p.add_argument("--protected", type=Path, help="a `cloak evaluate` cache directory (reach)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    torch.set_num_threads(1)
    data: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
    scorer = Scorer()
    data["model"] = scorer.models.diffvc_id
    if a.what == "sensitivity":
        done = {r["reference"] for r in data["rows"] if r["kind"] == "sensitivity"}
        for ref, src in PAIRS:
            if ref not in done:
                data["rows"] += scorer.sensitivity(ref, src)
                a.out.write_text(json.dumps(data, indent=1))
    else:
        if a.protected is None:
            raise SystemExit("reach needs --protected DIR (a cloak evaluate cache)")
        seen = {r["item"] for r in data["rows"] if r["kind"] == "reach"}
        items: dict[str, Path] = {}  # one per source file: runs with the same cloak share protected audio
        for f in sorted(a.protected.glob("cloak-*/*/*/protected.wav")):
            items.setdefault(json.loads((f.parent / "protected.json").read_text())["file"], f.parent)
        for item in items.values():
            if str(item) not in seen:
                data["rows"].append(scorer.reach(item))
                a.out.write_text(json.dumps(data, indent=1))
    data["summary"] = summary(data["rows"])
    a.out.write_text(json.dumps(data, indent=1))
    print(json.dumps(data["summary"], indent=1))


if __name__ == "__main__":
    main()
