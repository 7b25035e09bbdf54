"""`cloak evaluate`: the paper's protocol (arXiv 2505.12332 Sec. 5.1, App. B.2) on a directory of speakers.

For each evaluated speaker s, for each of its first N utterances u (trimmed to `max_seconds`):

1. protect u with the cloak (ProtectConfig; the speaker's sex from speakers.tsv / SOURCES.md picks the
   opposite-gender identity target);
2. the attacker clones K sources, utterances of *other speakers of the same sex* (the paper's gender-matched
   conversions), with the bundle's DiffVC, from references: the clean u ("clean"), the protected u
   ("protected"), and, for robustness, the protected u after each transform ("protected+T") with, as baselines,
   the clean u after the same transform ("clean+T");
3. every clone is scored: speaker cosine against the enrollment of s (mean embedding of s's *other* clean
   utterances) for every speaker encoder available, and DNSMOS P.835 / P.808; and against the enrollment of its
   source speaker (the attacker check: a model that keeps the source's voice cannot show a cloak's effect);
4. the cloak itself is measured on u: PESQ (wide-band), STOI, SNR, MCD, l-inf, and the speaker encoders' cosine
   of the reference itself (clean, protected, protected + each transform) to the enrollment of s.

ASV thresholds are calibrated at the EER on clean trials of the same speaker set (leave-one-out enrollment vs
utterance: target = an utterance against the enrollment of its speaker's other utterances, non-target = against
every other speaker's enrollment), the same kind of trial the clones are scored with. The exception is the paper's
black-box ASV, ECAPA-TDNN (speechbrain/spkrec-ecapa-voxceleb, run natively from the bundle's ecapa/ directory when
present, see cloak.bundle): it accepts at the paper's fixed cosine 0.25, and it is then the primary ASV for DSR.
The shipped black-box verifier (cloak.models.verifier: a small ECAPA-TDNN trained on corpus-train only, which the
cloak never differentiates through) is always scored beside GE2E; it accepts at the EER threshold shipped with its
weights (calibrated on corpus-train speakers held out from its training, the same leave-one-out enrollment trial),
so its acceptance rates do not move with the speaker set evaluated; the run's own EER calibration is reported
alongside. Without ECAPA it is the primary ASV.

Every per-file result (protected audio, each clone's scores, clean embeddings) is cached under the cache
directory (default OUT/cache) as soon as it is computed, keyed by a fingerprint of everything that determines it,
so a stopped run resumes where it was, and a run with other protection settings (e.g. another --losses set)
reuses the clean clones.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..audio import read_audio, to_mono, write_audio
from ..bundle import BundleError, Models
from ..config import ProtectConfig
from ..corpus import Speaker, list_speakers
from ..files import finite_json, jsonable, read_json, write_json
from ..jobs import Cancelled, CancelToken
from ..models.ecapa import ECAPA_THRESHOLD  # the paper's ASV acceptance threshold (ECAPA-TDNN cosine)
from ..protect import ENGINE_VERSION
from . import metrics as M
from .calibration import calibrate
from .encoders import build_encoders
from .plan import Utterance, duration, pick_sources, pick_utterances, safe_name, select_speakers, stable_seed
from .protocol import (
    DEFAULT_QUALITY_THRESHOLD,
    QUALITY_WHY,
    QUICK,
    QUICK_PROTECT,
    EvalSettings,
    versions,
)
from .report import build_report, write_outputs
from .transforms import get_transforms

CACHE_VERSION = 2
CLONE_RATE = 22_050


class Protected(Protocol):
    """What protecting one utterance gives (cloak.ProtectResult, or what a caller's protector returns)."""

    audio: np.ndarray
    metrics: dict[str, Any]


class ProtectFn(Protocol):
    """How the run protects one utterance. `cloak evaluate` passes the `protect` of the protector it gets from
    clients.cli.make_protector (the one way to a protector); it must protect with the run's `models`, whose
    checksums key the cache of protected audio. Default: cloak.protect on those models."""

    def __call__(self, audio: np.ndarray, sample_rate: int, config: ProtectConfig, *,
                 cancel: CancelToken | None = None) -> Protected: ...


def engine_protect(models: Models) -> ProtectFn:
    """cloak.protect on `models` (looked up at each call, so that tests can replace the engine)."""

    def protect(audio: np.ndarray, sample_rate: int, config: ProtectConfig, *,
                cancel: CancelToken | None = None) -> Protected:
        import cloak

        return cloak.protect(audio, sample_rate, models, config, cancel=cancel)

    return protect


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=jsonable).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------------- runner


class Evaluation:
    def __init__(self, settings: EvalSettings, models: Models, cancel: CancelToken | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True,
                 attacker: Models | None = None, protect: ProtectFn | None = None) -> None:
        self.s = settings
        self.models = models  # what the cloak differentiates through
        self.protect = protect if protect is not None else engine_protect(models)
        # what clones (transfer: a DiffVC the cloak never saw; default: the same one, white-box)
        self.attacker = attacker if attacker is not None else models
        self.transfer = attacker is not None
        self.cancel = cancel
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.show_progress = progress
        self.cfg = settings.config
        self.encoders, self.encoder_info = build_encoders(models, self.cfg)
        self.transforms = get_transforms(list(settings.transforms) if settings.transforms is not None else None)
        self.stats = {"protected": {"computed": 0, "reused": 0}, "clones": {"computed": 0, "reused": 0},
                      "embeddings": {"computed": 0, "reused": 0}}
        model_ids = [{"name": i.name, "sha256": i.sha256} for i in self.attacker.info]
        self.attack_fp = _digest({"v": CACHE_VERSION, "models": model_ids, "vocoder": str(self.attacker.vocoder_dir),
                                  "steps": settings.steps, "mode": settings.mode, "seed": settings.seed,
                                  "max_seconds": settings.max_seconds,
                                  "encoders": [(e.name, e.checksum) for e in self.encoders]})
        # the protected audio depends on the cloak's models and settings only, so a transfer run reuses it; clones of
        # it depend on both
        cloak_ids = [{"name": i.name, "sha256": i.sha256} for i in models.info]
        self.cloak_fp = _digest({"v": CACHE_VERSION, "models": cloak_ids,
                                 "vocoder": str(models.vocoder_dir), "max_seconds": settings.max_seconds,
                                 "config": self.cfg.to_dict(), "engine": ENGINE_VERSION})
        self.protect_fp = _digest({"attack": self.attack_fp, "cloak": self.cloak_fp})
        self._dnsmos: M.DNSMOS | None = None
        self._bar: Any = None

    # ---- small utilities

    @property
    def dnsmos(self) -> M.DNSMOS:
        if self._dnsmos is None:
            import torch

            self._dnsmos = M.DNSMOS(self.s.device, threads=torch.get_num_threads())
        return self._dnsmos

    @property
    def dnsmos_info(self) -> dict[str, Any] | None:
        """Paths and checksums of the DNSMOS models, once they are loaded."""
        return self._dnsmos.info if self._dnsmos is not None else None

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled("evaluation cancelled")

    def _tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what[-60:], refresh=False)
            self._bar.update(1)

    @staticmethod
    def _load(path: Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
        a = read_audio(path)
        x = to_mono(a.samples)
        if max_seconds is not None:
            x = x[: int(round(max_seconds * a.sample_rate))]
        return np.ascontiguousarray(x, np.float32), a.sample_rate

    def _embed_all(self, wave: np.ndarray, sr: int) -> dict[str, list[float]]:
        w16 = M.to_rate(wave, sr, 16_000)
        return {e.name: [float(v) for v in e.embed(w16)] for e in self.encoders}

    # ---- clean embeddings, calibration, enrollment

    def clean_embeddings(self, speakers: list[Speaker], files_per_speaker: dict[str, list[Path]]
                         ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """{speaker: {file name: {encoder: embedding}}}, cached per file."""
        root = self.s.cache / f"embeddings-{self.attack_fp}"
        out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for spk in speakers:
            out[spk.name] = {}
            for f in files_per_speaker[spk.name]:
                self._check_cancel()
                rec_path = root / safe_name(spk.name) / f"{safe_name(f.name)}.json"
                rec = read_json(rec_path)
                if rec is None or set(rec.get("embeddings", {})) != {e.name for e in self.encoders}:
                    x, sr = self._load(f)
                    rec = {"file": str(f), "embeddings": self._embed_all(x, sr)}
                    write_json(rec_path, rec)
                    self.stats["embeddings"]["computed"] += 1
                else:
                    self.stats["embeddings"]["reused"] += 1
                out[spk.name][f.name] = {k: np.asarray(v, np.float32) for k, v in rec["embeddings"].items()}
        return out

    def calibrate(self, emb: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
        return calibrate([e.name for e in self.encoders], emb)

    # ---- protection

    def protect_item(self, utt: Utterance) -> tuple[dict[str, Any], np.ndarray, np.ndarray, int]:
        """(record, clean reference, protected reference, rate), cached."""
        root = self.s.cache / f"cloak-{self.cloak_fp}" / utt.key
        rec_path, wav_path = root / "protected.json", root / "protected.wav"
        x, sr = self._load(utt.path, self.s.max_seconds)
        rec = read_json(rec_path)
        if rec is not None and wav_path.is_file():
            y, _ = self._load(wav_path)
            if y.size == x.size:
                self.stats["protected"]["reused"] += 1
                return rec, x, y, sr
        cfg = self.cfg
        if cfg.gender == "auto" and utt.speaker.sex in ("M", "F"):
            cfg = cfg.with_(gender="male" if utt.speaker.sex == "M" else "female")
        t0 = time.perf_counter()
        result = self.protect(x, sr, cfg, cancel=self.cancel)
        seconds = time.perf_counter() - t0
        self._check_cancel()
        y = result.audio.astype(np.float32)
        m = result.metrics
        rec = {
            "speaker": utt.speaker.name, "sex": utt.speaker.sex, "file": str(utt.path), "sample_rate": sr,
            "seconds_audio": x.size / sr, "protect_seconds": seconds, "gender": m.get("gender"),
            "opposite_speaker": m.get("opposite_speaker"), "losses_start": m.get("losses_start"),
            "losses_end": m.get("losses_end"), "engine_snr_db": m.get("snr_db"),
            "imperceptibility": M.imperceptibility(x, y, sr),
            "dnsmos_clean_reference": self.dnsmos(x, sr), "dnsmos_protected_reference": self.dnsmos(y, sr),
        }
        wav_path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(wav_path, y, sr, subtype="FLOAT", overwrite=True)
        write_json(rec_path, finite_json(rec))
        self.stats["protected"]["computed"] += 1
        return rec, x, y, sr

    # ---- cloning

    def clone_item(self, utt: Utterance, source: Path, condition: str, reference: np.ndarray, sr: int,
                   enroll: dict[str, np.ndarray], protected_cache: bool, save: bool,
                   enroll_source: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Clone `source` with `reference`; scores against the target speaker's enrollment and, when given, the
        source speaker's (`source_scores`; the run asks for them on clean references: is the attacker cloning at
        all, or keeping the source's voice?)."""
        from ..clone import clone

        fp = self.protect_fp if protected_cache else self.attack_fp
        root = self.s.cache / (f"protect-{fp}" if protected_cache else f"attack-{fp}") / utt.key
        name = f"{safe_name(source.parent.name)}__{safe_name(source.stem)}__{safe_name(condition)}"
        rec_path = root / f"{name}.json"
        rec = read_json(rec_path)
        if rec is not None and (enroll_source is None or "source_scores" in rec):
            self.stats["clones"]["reused"] += 1
            return rec
        src, src_sr = self._load(source, self.s.max_seconds)
        t0 = time.perf_counter()
        r = clone(src, src_sr, reference, sr, self.attacker, steps=self.s.steps, mode=self.s.mode, seed=self.s.seed)
        seconds = time.perf_counter() - t0
        wave = np.clip(np.nan_to_num(r.audio), -1.0, 1.0).astype(np.float32)
        w16 = M.to_rate(wave, r.sample_rate, 16_000)
        embs = {e.name: e.embed(w16) for e in self.encoders}
        scores = {k: M.cosine(v, enroll[k]) for k, v in embs.items()}
        rec = {"speaker": utt.speaker.name, "sex": utt.speaker.sex, "utterance": str(utt.path),
               "source": str(source), "source_speaker": source.parent.name, "condition": condition,
               "scores": scores, "dnsmos": self.dnsmos(wave, r.sample_rate), "clone_seconds": seconds,
               "seconds_audio": wave.size / r.sample_rate}
        if enroll_source is not None:
            rec["source_scores"] = {k: M.cosine(v, enroll_source[k]) for k, v in embs.items()}
        if save:
            root.mkdir(parents=True, exist_ok=True)
            write_audio(root / f"{name}.wav", wave, r.sample_rate, subtype="FLOAT", overwrite=True)
        write_json(rec_path, finite_json(rec))
        self.stats["clones"]["computed"] += 1
        return rec

    # ---- the whole protocol

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        s = self.s
        all_speakers = [Speaker(sp.name, sp.sex, [f for f in sp.files if duration(f) >= 0.1])
                        for sp in list_speakers(s.speakers_dir)]  # unreadable / empty files are left out
        all_speakers = [sp for sp in all_speakers if sp.files]
        chosen = select_speakers(all_speakers, s.max_speakers)
        if not chosen:
            raise ValueError(f"{s.speakers_dir}: no speaker has at least 2 audio files (one to protect, one to "
                             "enroll)")
        plan: list[tuple[Utterance, list[Path], bool]] = []
        for spk in chosen:
            for f in pick_utterances(spk, s.utterances, s.min_seconds):
                sources, matched = pick_sources(spk, f, all_speakers, s.sources, s.seed)
                if sources:
                    plan.append((Utterance(spk, f), sources, matched))
        if not plan:
            raise ValueError(f"{s.speakers_dir}: nothing to evaluate (need utterances >= {s.min_seconds} s and "
                             "at least two speakers)")
        chosen_names = {spk.name for spk in chosen}
        files_for: dict[str, list[Path]] = {}
        for spk in all_speakers:
            files_for[spk.name] = list(spk.files) if spk.name in chosen_names else spk.files[: s.calibration_files]
        n_conditions = 2 + len(self.transforms) * (2 if s.transform_baselines else 1)
        total = sum(len(src) for _, src, _ in plan) * n_conditions + len(plan)
        self.log(f"cloak evaluate: {len(chosen)} speaker(s), {len(plan)} protected utterance(s), {total - len(plan)} "
                 f"clone(s); cache {s.cache}")

        emb = self.clean_embeddings(all_speakers, files_for)
        calib_emb = {spk: {f.name: emb[spk][f.name] for f in files_for[spk][: s.calibration_files]}
                     for spk in emb}
        calibration = self.calibrate(calib_emb)

        items: list[dict[str, Any]] = []
        protected_recs: list[dict[str, Any]] = []
        example: dict[str, Any] | None = None
        bar_ctx = None
        if self.show_progress:
            from tqdm import tqdm

            bar_ctx = tqdm(total=total, desc="evaluate", unit="step", file=sys.stderr, dynamic_ncols=True)
            self._bar = bar_ctx
        try:
            for utt, sources, matched in plan:
                self._check_cancel()
                enroll_vecs = {e.name: M.enrollment([v[e.name] for fname, v in emb[utt.speaker.name].items()
                                                     if fname != utt.path.name]) for e in self.encoders}
                prec, x, y, sr = self.protect_item(utt)
                prec = dict(prec, gender_matched_sources=matched, sources=[str(p) for p in sources],
                            enrollment_files=len(emb[utt.speaker.name]) - 1)
                protected_recs.append(prec)
                self._tick(f"protect {utt.key}")
                if example is None:
                    example = {"key": utt.key, "clean": x, "protected": y, "sr": sr}
                refs: list[tuple[str, np.ndarray, bool, str | None, str]] = [
                    ("clean", x, False, None, "clean"), ("protected", y, True, None, "protected")]
                baselines: list[tuple[str, np.ndarray, bool, str | None, str]] = []  # measured, not cloned
                for t in self.transforms:
                    seed_t = stable_seed(s.seed, utt.key, t.name)
                    refs.append((f"protected+{t.name}", t(y, sr, seed_t), True, t.name, "protected"))
                    (refs if s.transform_baselines else baselines).append(
                        (f"clean+{t.name}", t(x, sr, seed_t), False, t.name, "clean"))
                # what the cloak does to the recording itself, as each speaker encoder hears it (no attacker; the
                # clean + transform baselines are cheap here, so always measured)
                prec["reference_identity"] = {
                    cond: {k: M.cosine(np.asarray(v, np.float32), enroll_vecs[k])
                           for k, v in self._embed_all(ref, sr).items()}
                    for cond, ref, *_ in refs + baselines}
                for src in sources:
                    src_spk = src.parent.name
                    others = [v for fname, v in emb.get(src_spk, {}).items() if fname != src.name]
                    enroll_src = {e.name: M.enrollment([v[e.name] for v in others])
                                  for e in self.encoders} if others else None
                    base: dict[str, dict[str, Any]] = {}
                    for cond, ref, prot, tname, kind in refs:
                        self._check_cancel()
                        identity = tname is not None and np.array_equal(ref, y if prot else x)
                        if identity:  # e.g. resample to 16 kHz and back on 16 kHz audio: same clone as untransformed
                            rec = dict(base[kind], condition=cond, identity_transform=True)
                        else:
                            rec = self.clone_item(utt, src, cond, ref, sr, enroll_vecs, protected_cache=prot,
                                                  save=s.save_audio and tname is None,
                                                  enroll_source=enroll_src)
                            rec = dict(rec, identity_transform=False)
                        rec.update(kind=kind, transform=tname, gender_matched=matched)
                        if tname is None:
                            base[kind] = rec
                        items.append(rec)
                        self._tick(f"{cond} {utt.key}")
        finally:
            if bar_ctx is not None:
                bar_ctx.close()
            self._bar = None

        report = build_report(self, chosen, all_speakers, calibration, protected_recs, items,
                              time.perf_counter() - t_start)
        write_outputs(report, s.out_dir, example=example, plots=s.plots)
        return report


def evaluate(settings: EvalSettings, models: Models, cancel: CancelToken | None = None,
             log: Callable[[str], None] | None = None, progress: bool = True,
             attacker: Models | None = None, protect: ProtectFn | None = None) -> dict[str, Any]:
    """Run the evaluation protocol and write OUT/report.json, OUT/report.md and the PNG plots; returns the report.
    `attacker`: the DiffVC that clones, when it is not the one the cloak is computed on (transfer).
    `protect`: how utterances are protected, with `models` (see ProtectFn; default cloak.protect).
    Raises ValueError for an unusable speaker directory, BundleError for model problems, Cancelled."""
    if settings.steps < 1 or settings.utterances < 1 or settings.sources < 1:
        raise ValueError("steps, utterances and sources must be >= 1")
    try:
        M.dnsmos_model_paths()
    except FileNotFoundError as e:
        raise BundleError(str(e)) from e
    (attacker or models).vocoder()  # fail early (BundleError) when the attacker's vocoder is missing
    return Evaluation(settings, models, cancel, log, progress, attacker, protect).run()


__all__ = ["EvalSettings", "Evaluation", "ProtectFn", "Protected", "engine_protect", "evaluate", "select_speakers",
           "pick_sources", "pick_utterances", "QUICK", "QUICK_PROTECT", "versions", "calibrate",
           "DEFAULT_QUALITY_THRESHOLD", "ECAPA_THRESHOLD", "QUALITY_WHY"]
