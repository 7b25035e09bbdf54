"""Train the black-box speaker verifier (`cloak.models.verifier`) on `shared/corpus-train` only.

Stages (deterministic given the seed; `all` runs them in order and each skips what is already done):
  prepare   split corpus-train by speaker into training speakers and `holdout` held-out speakers (seeded); the
            training speakers' utterances, at speeds 0.9 / 1.0 / 1.1 (resampling: pitch and formants move, so each
            speed is its own class, as in Kaldi / WeSpeaker speed perturbation), become un-normalised dB log-mels
            of the verifier's own front-end in CACHE/features.pt (float16), computed once;
  train     ECAPA-TDNN at reduced width with an additive-angular-margin softmax (AAM, scale 30, margin ramped
            0 -> 0.2) over those classes; each batch is drawn from a generator seeded by (seed, step): one class
            per example uniformly, a random 2-3 s crop (one length per batch), then, on the mel power spectrum,
            a simulated room (per-bin exponential decay, RT60 0.2-0.9 s, DRR 0-15 dB), a noise floor (SNR 5-30 dB,
            random spectral tilt), a low-pass (cut-off 3.4-7 kHz, as MP3 or a phone band does), a frequency and a
            time mask. A gain change needs no simulation: the front-end subtracts the mean log-mel of its input, so
            a constant gain leaves the features unchanged. Adam, warm-up then cosine decay, bf16 autocast where
            the CPU runs it natively (weights and export fp32). A checkpoint every few minutes (atomic), resumed
            on restart at the same step with the same batches; held-out EER in the log every `val_every` steps;
  export    calibrates the acceptance threshold on the held-out corpus-train speakers (3 s segments of their
            files, each segment against the leave-one-out enrollment of its speaker's other segments and against
            every other speaker's enrollment: the trial `cloak evaluate` scores clones with), measures the EER on
            an evaluation corpus (every file of every speaker, all same / different-speaker pairs; also the
            validation speakers alone) and writes the versioned checkpoint plus CACHE/eval.json.

    python -m cloak.train.verifier --cache /work/runs/verifier --out cloak/data/verifier.pt

The augmentations are cloak.train.mel_augment's, the AAM head cloak.train.aam's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import read_audio, to_mono
from ..corpus import list_speakers
from ..cpu import cpu_has_native_bf16
from ..evaluate.metrics import compute_eer, enrollment
from ..features import resample
from ..files import replace_atomically, write_json
from ..models.verifier import SpeakerVerifier, VerifierConfig, checkpoint
from .aam import AAMSoftmax
from .mel_augment import augment, mel_bin_of

log = logging.getLogger("cloak.train.verifier")

RATE = 16_000
HOP_S = 0.01
SPEEDS = (1.0, 0.9, 1.1)
CACHE_VERSION = 1
VAL_SPEAKERS = ("vctk_p225", "librispeech_3080", "librispeech_2414")  # of shared/corpus; reported, never tuned on
SEGMENT_S = 3.0


@dataclass
class VerifierSettings:
    seed: int = 2024
    holdout: int = 36  # corpus-train speakers kept out of training: threshold calibration and the log's EER
    channels: int = 128
    embedding_dim: int = 192
    n_mels: int = 80
    steps: int = 2400
    batch: int = 64
    crop_s: tuple[float, float] = (2.0, 3.0)
    lr: float = 2e-3
    lr_final: float = 2e-5
    warmup: int = 150
    weight_decay: float = 2e-5
    scale: float = 30.0
    margin: float = 0.2
    margin_ramp: tuple[float, float] = (0.1, 0.4)  # fraction of the steps over which the margin goes 0 -> margin
    p_room: float = 0.35
    p_noise: float = 0.5
    p_lowpass: float = 0.2
    p_freq_mask: float = 0.5
    p_time_mask: float = 0.5
    val_every: int = 300

    def model_config(self) -> VerifierConfig:
        return VerifierConfig(n_mels=self.n_mels, channels=self.channels, embedding_dim=self.embedding_dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_s"] = list(self.crop_s)
        d["margin_ramp"] = list(self.margin_ramp)
        return d


def save_atomic(path: Path, obj: Any) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------------------------------- data


def read_16k(path: Path) -> torch.Tensor:
    a = read_audio(path)
    x = torch.from_numpy(np.ascontiguousarray(to_mono(a.samples)))
    with torch.no_grad():
        return resample(x, a.sample_rate, RATE).float()


def speed(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Speed perturbation by resampling: played at 16 kHz, the result is `factor` times faster."""
    if factor == 1.0:
        return wave
    with torch.no_grad():
        return resample(wave, int(round(RATE * factor)), RATE)


def split_speakers(names: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) speaker names; the held-out ones a seeded sample of the sorted names."""
    ordered = sorted(names)
    held = set(random.Random(seed).sample(ordered, min(holdout, max(0, len(ordered) - 2))))
    return [n for n in ordered if n not in held], [n for n in ordered if n in held]


def prepare(train_dir: Path, cache: Path, st: VerifierSettings) -> Path:
    out = cache / "features.pt"
    key = {"version": CACHE_VERSION, "train_dir": str(train_dir), "holdout": st.holdout, "seed": st.seed,
           "n_mels": st.n_mels, "speeds": list(SPEEDS)}
    if out.is_file():
        obj = torch.load(out, weights_only=True)
        if obj.get("key") == key:
            log.info("features: reusing %s", out)
            return out
    speakers = list_speakers(train_dir)
    train_names, held_names = split_speakers([s.name for s in speakers], st.holdout, st.seed)
    fbank = SpeakerVerifier(st.model_config()).fbank
    items: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    by_name = {s.name: s for s in speakers}
    for i, name in enumerate(train_names):
        for f in by_name[name].files:
            wave = read_16k(f)
            for k, factor in enumerate(SPEEDS):
                with torch.no_grad():
                    feats = fbank.log_mel(speed(wave, factor)[None])[0]
                items.append({"speaker": name, "label": i * len(SPEEDS) + k, "file": f.name, "speed": factor,
                              "feats": feats.to(torch.float16)})
        if i % 25 == 0:
            log.info("features: %d/%d speakers, %.0f s", i + 1, len(train_names), time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    save_atomic(out, {"key": key, "train_speakers": train_names, "holdout_speakers": held_names, "items": items})
    frames = sum(int(it["feats"].shape[0]) for it in items if it["speed"] == 1.0)
    log.info("features: %d training speakers (%d classes), %d held out, %.1f min at speed 1 -> %s",
             len(train_names), len(train_names) * len(SPEEDS), len(held_names), frames * HOP_S / 60, out)
    return out


# ------------------------------------------------------------------------ batches (cloak.train.mel_augment)


class Batches:
    """Deterministic batches: batch `step` depends only on (seed, step)."""

    def __init__(self, items: list[dict[str, Any]], st: VerifierSettings) -> None:
        self.st = st
        self.by_label: dict[int, list[dict[str, Any]]] = {}
        for it in items:
            self.by_label.setdefault(int(it["label"]), []).append(it)
        self.labels = sorted(self.by_label)
        self.cutoffs = (mel_bin_of(3400.0, st.n_mels, RATE), mel_bin_of(7000.0, st.n_mels, RATE))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.st
        g = torch.Generator().manual_seed(st.seed * 1_000_003 + step)
        lo, hi = (int(s / HOP_S) for s in st.crop_s)
        length = lo + int(torch.randint(0, hi - lo + 1, (1,), generator=g))
        feats, labels = [], []
        for _ in range(st.batch):
            label = self.labels[int(torch.randint(0, len(self.labels), (1,), generator=g))]
            group = self.by_label[label]
            sizes = torch.tensor([float(it["feats"].shape[0]) for it in group])
            it = group[int(torch.multinomial(sizes, 1, generator=g))]
            x = it["feats"]
            if x.shape[0] < length:  # tile a short utterance
                x = x.repeat(math.ceil(length / x.shape[0]), 1)
            start = int(torch.randint(0, x.shape[0] - length + 1, (1,), generator=g))
            feats.append(augment(x[start:start + length], st, g, self.cutoffs, HOP_S))
            labels.append(label)
        return torch.stack(feats), torch.tensor(labels)


# ------------------------------------------------------------------------------------------------- training


def lr_at(step: int, st: VerifierSettings) -> float:
    if step < st.warmup:
        return st.lr * (step + 1) / st.warmup
    t = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.lr_final + 0.5 * (st.lr - st.lr_final) * (1 + math.cos(math.pi * min(1.0, t)))


def margin_at(step: int, st: VerifierSettings) -> float:
    a, b = (f * st.steps for f in st.margin_ramp)
    return st.margin * min(1.0, max(0.0, (step - a) / max(1.0, b - a)))


def segments(feats_or_wave: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Non-overlapping `length`-long pieces along the first axis; a shorter input is one piece of itself."""
    n = feats_or_wave.shape[0]
    if n < 2 * length:
        return [feats_or_wave[:length]] if n >= length else [feats_or_wave]
    return [feats_or_wave[i:i + length] for i in range(0, n - length + 1, length)]


def pair_trials(emb: np.ndarray, labels: list[str]) -> tuple[list[float], list[float]]:
    """All unordered pairs of distinct rows: (same-speaker cosines, different-speaker cosines)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    s = e @ e.T
    lab = np.asarray(labels)
    iu = np.triu_indices(len(lab), 1)
    same = lab[iu[0]] == lab[iu[1]]
    return s[iu][same].tolist(), s[iu][~same].tolist()


def enrollment_trials(emb: np.ndarray, labels: list[str]) -> tuple[list[float], list[float]]:
    """Each row against the leave-one-out enrollment of its speaker (target; speakers with >= 2 rows) and against
    the enrollment of every other speaker's rows (non-target): `cloak evaluate`'s calibration trial."""
    groups: dict[str, list[np.ndarray]] = {}
    for v, name in zip(emb, labels, strict=True):
        groups.setdefault(name, []).append(v)
    full = {k: enrollment(v) for k, v in groups.items()}
    tar: list[float] = []
    non: list[float] = []
    for k, vecs in groups.items():
        for i, v in enumerate(vecs):
            u = v / max(float(np.linalg.norm(v)), 1e-12)
            if len(vecs) > 1:
                tar.append(float(u @ enrollment([w for j, w in enumerate(vecs) if j != i])))
            non.extend(float(u @ full[o]) for o in groups if o != k)
    return tar, non


def _embed_feats(model: SpeakerVerifier, pieces: list[torch.Tensor]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for p in pieces:
            out.append(F.normalize(model.embed_features(p.float()[None]), dim=-1)[0].numpy())
    return np.stack(out)


def holdout_eer(model: SpeakerVerifier, pieces: list[torch.Tensor], labels: list[str]) -> dict[str, float]:
    was = model.training
    model.eval()
    emb = _embed_feats(model, pieces)
    model.train(was)
    return {"pair_eer": compute_eer(*pair_trials(emb, labels)).eer,
            "enrollment_eer": compute_eer(*enrollment_trials(emb, labels)).eer}


def holdout_pieces(train_dir: Path, names: list[str], model: SpeakerVerifier) -> tuple[list[torch.Tensor], list[str]]:
    """3 s feature segments of the held-out speakers' files (for the training log)."""
    by_name = {s.name: s for s in list_speakers(train_dir)}
    pieces, labels = [], []
    length = int(SEGMENT_S / HOP_S)
    for name in names:
        for f in by_name[name].files:
            with torch.no_grad():
                feats = model.log_mel(read_16k(f)[None])[0]
            for p in segments(feats, length):
                pieces.append(p)
                labels.append(name)
    return pieces, labels


def train(train_dir: Path, cache: Path, st: VerifierSettings, budget_s: float, checkpoint_s: float,
          use_bf16: bool, stop_after: int | None = None) -> Path | None:
    """Train to `st.steps` (resuming CACHE/train.pt when its settings match); returns the final state's path, or
    None when the time budget ran out or step `stop_after` was reached first (the checkpoint is then resumable)."""
    data = torch.load(cache / "features.pt", weights_only=True)
    items = data["items"]
    n_classes = len(data["train_speakers"]) * len(SPEEDS)
    torch.manual_seed(st.seed)
    model = SpeakerVerifier(st.model_config())
    head = AAMSoftmax(st.embedding_dim, n_classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=st.lr, weight_decay=st.weight_decay)
    state_path, final_path = cache / "train.pt", cache / "final.pt"
    if final_path.is_file():
        obj = torch.load(final_path, weights_only=True)
        if obj.get("settings") == st.to_dict():
            log.info("train: already done (%s)", final_path)
            return final_path
    step, spent = 0, 0.0
    if state_path.is_file():
        obj = torch.load(state_path, weights_only=True)
        if obj.get("settings") != st.to_dict():
            raise SystemExit(f"{state_path} was made with other settings; move it away to start over:\n"
                             f"  file {obj.get('settings')}\n  now  {st.to_dict()}")
        model.load_state_dict(obj["model"])
        head.load_state_dict(obj["head"])
        opt.load_state_dict(obj["opt"])
        step, spent = int(obj["step"]), float(obj.get("seconds", 0.0))
        log.info("train: resumed at step %d (%.0f s of training before)", step, spent)
    pieces, labels = holdout_pieces(train_dir, data["holdout_speakers"], model)
    batches = Batches(items, st)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train: %d parameters, %d classes, %d steps of %d, bf16 autocast %s", n_params, n_classes, st.steps,
             st.batch, use_bf16)

    t_start = last_save = time.perf_counter()

    def save(s: int) -> None:
        save_atomic(state_path, {"settings": st.to_dict(), "step": s, "model": model.state_dict(),
                                 "head": head.state_dict(), "opt": opt.state_dict(),
                                 "seconds": spent + time.perf_counter() - t_start})

    window: list[tuple[float, float]] = []
    model.train()
    while step < st.steps:
        if time.perf_counter() - t_start > budget_s or (stop_after is not None and step >= stop_after):
            save(step)
            log.info("train: stopped at step %d; run again to resume", step)
            return None
        t0 = time.perf_counter()
        x, y = batches(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, st)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            emb = model.embed_features(x)
        loss, acc = head(emb, y, st.scale, margin_at(step, st))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        step += 1
        window.append((loss.item(), acc.item()))
        if step % 25 == 0:
            lm, am = np.mean(window, axis=0)
            window.clear()
            log.info("step %d loss %.3f acc %.3f lr %.2e margin %.3f %.2f s/step", step, lm, am, lr_at(step - 1, st),
                     margin_at(step - 1, st), time.perf_counter() - t0)
        if step % st.val_every == 0 or step == st.steps:
            log.info("step %d held-out corpus-train EER %s", step,
                     {k: round(100 * v, 2) for k, v in holdout_eer(model, pieces, labels).items()})
        if time.perf_counter() - last_save > checkpoint_s:
            save(step)
            last_save = time.perf_counter()
    save(step)
    save_atomic(final_path, {"settings": st.to_dict(), "model": model.state_dict(),
                             "seconds": spent + time.perf_counter() - t_start})
    return final_path


# --------------------------------------------------------------------------------------------------- export


def embed_files(model: SpeakerVerifier, files: list[tuple[str, Path]], segment_s: float | None = None
                ) -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings of whole files (segment_s None) or of their `segment_s` pieces: (rows, speaker labels, ids)."""
    rows, labels, ids = [], [], []
    for name, f in files:
        wave = read_16k(f)
        parts = [wave] if segment_s is None else segments(wave, int(segment_s * RATE))
        for k, w in enumerate(parts):
            with torch.no_grad():
                rows.append(model.embed(w[None])[0].numpy())
            labels.append(name)
            ids.append(f"{name}/{f.name}" + ("" if segment_s is None else f"#{k}"))
    return np.stack(rows), labels, ids


def _eer_entry(tar: list[float], non: list[float]) -> dict[str, Any]:
    e = compute_eer(tar, non)
    return {"eer": e.eer, "threshold": e.threshold, "n_target": e.n_target, "n_nontarget": e.n_nontarget}


def evaluate_corpus(model: SpeakerVerifier, corpus: Path, threshold: float) -> dict[str, Any]:
    """EER over every file of every speaker (all pairs; and each file vs leave-one-out enrollments), the same for
    the validation speakers alone, and the acceptance rates at the shipped threshold."""
    speakers = list_speakers(corpus)
    files = [(s.name, f) for s in speakers for f in s.files]
    emb, labels, _ = embed_files(model, files)
    out: dict[str, Any] = {"corpus": str(corpus), "speakers": len(speakers), "files": len(files)}
    for key, keep in (("all", None), ("validation", set(VAL_SPEAKERS))):
        rows = [i for i, n in enumerate(labels) if keep is None or n in keep]
        if len({labels[i] for i in rows}) < 2:
            out[key] = None
            continue
        e, lab = emb[rows], [labels[i] for i in rows]
        pt, pn = pair_trials(e, lab)
        et, en = enrollment_trials(e, lab)
        out[key] = {"speakers": sorted(set(lab)), "files": len(rows),
                    "pairs": _eer_entry(pt, pn), "enrollment": _eer_entry(et, en),
                    "at_shipped_threshold": {"enrollment_target_accept": float(np.mean(np.array(et) >= threshold)),
                                             "enrollment_nontarget_accept": float(np.mean(np.array(en) >= threshold)),
                                             "pair_target_accept": float(np.mean(np.array(pt) >= threshold)),
                                             "pair_nontarget_accept": float(np.mean(np.array(pn) >= threshold))}}
    return out


def export(train_dir: Path, corpus: Path, cache: Path, out: Path, st: VerifierSettings) -> dict[str, Any]:
    data = torch.load(cache / "features.pt", weights_only=True)
    final = torch.load(cache / "final.pt", weights_only=True)
    if final.get("settings") != st.to_dict():
        raise SystemExit(f"{cache / 'final.pt'} was trained with other settings than these")
    model = SpeakerVerifier(st.model_config())
    model.load_state_dict(final["model"], strict=True)
    model.eval()
    by_name = {s.name: s for s in list_speakers(train_dir)}
    held = [(n, f) for n in data["holdout_speakers"] for f in by_name[n].files]
    emb, labels, _ = embed_files(model, held, SEGMENT_S)
    tar, non = enrollment_trials(emb, labels)
    cal = compute_eer(tar, non)
    pt, pn = pair_trials(emb, labels)
    calibration = {
        "threshold": float(cal.threshold), "eer": float(cal.eer), "n_target": cal.n_target,
        "n_nontarget": cal.n_nontarget,
        "trial": f"{SEGMENT_S:g} s segment vs leave-one-out enrollment (mean of L2-normalised embeddings of the "
                 "speaker's other segments) and vs every other speaker's enrollment",
        "speakers": sorted(set(labels)), "segments": len(labels),
        "data": f"{len(set(labels))} speakers of corpus-train held out from training (seeded split)",
        "pair_eer": compute_eer(pt, pn).eer,
    }
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"settings": st.to_dict(), "parameters": n_params, "train_dir": "shared/corpus-train",
            "train_speakers": len(data["train_speakers"]), "classes": len(data["train_speakers"]) * len(SPEEDS),
            "holdout_speakers": list(data["holdout_speakers"]), "train_seconds": final.get("seconds"),
            "torch": str(torch.__version__)}
    save_atomic(out, checkpoint(model, calibration, meta))
    from ..models.verifier import load_verifier

    shipped = load_verifier(out)  # what users get: strict load of the written file
    report = {"checkpoint": str(out), "bytes": out.stat().st_size, "sha256": shipped.checksum,
              "parameters": n_params, "calibration": {k: v for k, v in calibration.items() if k != "speakers"},
              "evaluation": evaluate_corpus(shipped, corpus, calibration["threshold"]), "meta": meta}
    write_json(cache / "eval.json", report)
    return report


# ------------------------------------------------------------------------------------------------------ cli


def main(argv: list[str] | None = None) -> None:
    default_out = Path(__file__).resolve().parents[1] / "data" / "verifier.pt"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("prepare", "train", "export", "all"), default="all")
    p.add_argument("--train-dir", default="../shared/corpus-train", help="training speakers (default %(default)s)")
    p.add_argument("--corpus", default="../shared/corpus", help="evaluation speakers (default %(default)s)")
    p.add_argument("--cache", default="runs/verifier", help="features, checkpoints, eval.json (default %(default)s)")
    p.add_argument("--out", default=str(default_out), help="the exported checkpoint (default: the shipped one)")
    p.add_argument("--seed", type=int, default=VerifierSettings.seed)
    p.add_argument("--steps", type=int, default=VerifierSettings.steps)
    p.add_argument("--channels", type=int, default=VerifierSettings.channels)
    p.add_argument("--batch", type=int, default=VerifierSettings.batch)
    p.add_argument("--hours", type=float, default=1.0, help="time budget of the train stage in this run")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; bf16 results depend on it)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training matmuls: auto = bf16 autocast where the CPU has native bf16")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    st = VerifierSettings(seed=a.seed, steps=a.steps, channels=a.channels, batch=a.batch)
    use_bf16 = a.precision == "bf16" or (a.precision == "auto" and cpu_has_native_bf16())
    cache, train_dir = Path(a.cache), Path(a.train_dir)
    if a.stage in ("prepare", "all"):
        prepare(train_dir, cache, st)
    if a.stage in ("train", "all"):
        if train(train_dir, cache, st, a.hours * 3600, a.checkpoint_minutes * 60, use_bf16) is None:
            return
    if a.stage in ("export", "all"):
        report = export(train_dir, Path(a.corpus), cache, Path(a.out), st)
        ev = report["evaluation"]
        print(json.dumps({"bytes": report["bytes"], "threshold": report["calibration"]["threshold"],
                          "holdout_eer": report["calibration"]["eer"], "corpus_pair_eer": ev["all"]["pairs"]["eer"],
                          "validation_pair_eer": ev["validation"]["pairs"]["eer"]}, indent=1))


if __name__ == "__main__":
    main()
