"""Train cloak-mini 2: the speaker-adaptive prior, then the decoder fine-tuned to start from its means.

Stages (each resumable, each deterministic given the seed; run after `cloak.train.mini --stage prepare`):
  features  per utterance: the encoder's average-voice mean (the shipped cloak-mini encoder, unchanged) and the
            log-F0 contour on the mel frame grid (Praat, `cloak.pitch`);
  prior     `SpeakerPrior` regresses the real log-mel of a crop from its average-voice mean, its own log-F0 contour
            and a condition taken from *another* crop or utterance of the same speaker (d-vector + envelope
            statistics); its F0 head learns the speaker's log-F0 mean and spread from the same condition;
  decoder   the DiffVC decoder, initialised from the shipped one, fine-tuned with the official score-matching loss
            where the prior mean is the prior's output for the crop (conditioned on another crop, with the crop's
            own contour): it learns to add detail to a mean that already carries the voice;
  export    the versioned checkpoint {format: cloak-mini-2, config, state_dict, prior_config, prior_state_dict, meta}.

    python -m cloak.train.prior --cache runs/mini --hours 1.5
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..models.diffvc import DiffVC
from ..models.prior import PriorConfig, SpeakerPrior
from ..pitch import contour_stats, f0_contour
from .mini import MINI_CONFIG, VAL_SPEAKERS, cpu_has_native_bf16, load_items, optimizer_step, perturb_mean, save_atomic
from .rooms import random_room
from .targets import speaker_stats

log = logging.getLogger("cloak.train.prior")

FORMAT = "cloak-mini-2"
EMBEDDED = Path(__file__).resolve().parents[1] / "data" / "cloak-mini.pt"


@dataclass
class PriorSettings:
    seed: int = 4321
    prior_steps: int = 3000
    prior_batch: int = 24
    prior_frames: int = 128
    prior_lr: float = 1e-3
    ref_frames: tuple[int, int] = (96, 320)  # reference crop length drawn per batch in this range
    # random warp of the mel axis of the average-voice mean in prior training (+-mean_warp, vocal-tract length):
    # in training the mean and the reference come from one speaker, so without it the prior may take the voice from
    # what is left of the speaker in the mean (per-bin offsets and scales are removed by the normalisation anyway)
    mean_warp: float = 0.0
    # share of source crops whose mel passes through a simulated room / noise floor before the encoder (target and
    # condition stay as recorded), so the prior learns to take the recording conditions from the reference
    # (`cloak.train.rooms`, where the measurement that motivates it is)
    source_rooms: float = 0.0
    # pseudo-phone units of the source (PriorConfig.n_units; 0 = off): k-means of the training speakers'
    # normalised average-voice means, fitted once before prior training (`fit_units`)
    n_units: int = 0
    # written into the exported prior_config: the conversion-time vocal-tract scaling (see PriorConfig); 0.25 is the
    # a-priori value (formants ~1.17x for F0 ~1.9x between typical male and female voices), not fitted to any speaker
    vtl_exponent: float = 0.25
    dec_steps: int = 1500
    dec_batch: int = 8
    dec_frames: int = 64
    dec_lr: float = 1e-4
    ckpt_every: int = 250
    ema_decay: float = 0.998
    bf16: bool = False


# ------------------------------------------------------------------------------------------------------------
def compute_features(items: list[dict], cache: Path, init: Path) -> Path:
    """Encoder means (the shipped encoder) and log-F0 contours of every prepared item."""
    out = cache / "prior_features.pt"
    if out.exists():
        return out
    ck = torch.load(init, weights_only=True)
    model = DiffVC.from_config(MINI_CONFIG)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    offsets: dict[str, int] = defaultdict(int)
    rows = []
    for k, it in enumerate(items):
        mel = it["mel"]
        with torch.no_grad():
            mean = model.average_voice(mel[None], torch.ones(1, 1, mel.shape[1]))[0]
        x, sr = sf.read(it["file"], dtype="float32", always_2d=True)
        x = x.mean(1)
        a = offsets[it["file"]]  # an utterance split into train / val_seen frames: the second part starts here
        offsets[it["file"]] += mel.shape[1]
        log_f0, voiced = f0_contour(x, sr, a + mel.shape[1])
        rows.append({"mean": mean.clone(), "log_f0": torch.from_numpy(log_f0[a:]).clone(),
                     "voiced": torch.from_numpy(voiced[a:]).clone()})
        if k % 100 == 0:
            log.info("features %d/%d", k, len(items))
    save_atomic(out, {"rows": rows})
    return out


def _speaker_f0(items: list[dict], feats: list[dict]) -> dict[str, tuple[float, float]]:
    by: dict[str, list[np.ndarray]] = defaultdict(list)
    vs: dict[str, list[np.ndarray]] = defaultdict(list)
    for it, f in zip(items, feats, strict=True):
        by[it["speaker"]].append(f["log_f0"].numpy())
        vs[it["speaker"]].append(f["voiced"].numpy())
    return {s: contour_stats(np.concatenate(by[s]), np.concatenate(vs[s])) for s in by}


class Batches:
    """Training crops: a target crop of one utterance, and a reference crop from another utterance of the same
    speaker when there is one (else from the same utterance), with that utterance's d-vector."""

    def __init__(self, items: list[dict], feats: list[dict], split: str, seed: int) -> None:
        self.rows = [(it, f) for it, f in zip(items, feats, strict=True) if it["split"] == split]
        self.by_spk: dict[str, list[int]] = defaultdict(list)
        for i, (it, _) in enumerate(self.rows):
            self.by_spk[it["speaker"]].append(i)
        self.weights = [it["mel"].shape[1] for it, _ in self.rows]
        self.rng = random.Random(seed)
        with torch.no_grad():  # whole-utterance statistics of the average voice, as a conversion sees them
            self.src_stats = [SpeakerPrior.source_stats(f["mean"][None], torch.ones(1, 1, f["mean"].shape[1]))
                              for _, f in self.rows]

    def _crop(self, n: int, frames: int) -> int:
        return self.rng.randrange(0, n - frames + 1) if n > frames else 0

    def sample(self, batch: int, frames: int, ref_frames: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A batch of crops and the speaker of each."""
        idx = self.rng.choices(range(len(self.rows)), weights=self.weights, k=batch)
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for i in idx:
            it, f = self.rows[i]
            others = [j for j in self.by_spk[it["speaker"]] if j != i]
            r_it = self.rows[self.rng.choice(others)][0] if others else it
            n = it["mel"].shape[1]
            a = self._crop(n, frames)
            m = torch.zeros(1, frames)
            m[:, :min(frames, n)] = 1
            for key, src in (("mel", it["mel"]), ("mean", f["mean"])):
                out[key].append(_fit(src[:, a:a + frames], frames, math.log(1e-5)))
            out["log_f0"].append(_fit(f["log_f0"][None, a:a + frames], frames, 5.0))
            out["voiced"].append(_fit(f["voiced"][None, a:a + frames].float(), frames, 0.0))
            out["mask"].append(m)
            out["src_mean"].append(self.src_stats[i][0][0])
            out["src_std"].append(self.src_stats[i][1][0])
            rn = r_it["mel"].shape[1]
            b = self._crop(rn, ref_frames)
            rm = torch.zeros(1, ref_frames)
            rm[:, :min(ref_frames, rn)] = 1
            out["ref_mel"].append(_fit(r_it["mel"][:, b:b + ref_frames], ref_frames, math.log(1e-5)))
            out["ref_mask"].append(rm)
            out["c"].append(r_it["dvec"])
        return {k: torch.stack(v) for k, v in out.items()}, [self.rows[i][0]["speaker"] for i in idx]


def _fit(x: torch.Tensor, frames: int, fill: float) -> torch.Tensor:
    if x.shape[-1] >= frames:
        return x[..., :frames]
    return torch.cat([x, torch.full((*x.shape[:-1], frames - x.shape[-1]), fill, dtype=x.dtype)], -1)


def _prior_loss(prior: SpeakerPrior, b: dict[str, torch.Tensor], f0_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    spk = prior.condition(b["c"], b["ref_mel"], b["ref_mask"])
    out = prior(b["mean"], b["mask"], b["log_f0"], b["voiced"], spk, (b["src_mean"], b["src_std"]))
    n = b["mask"].sum() * out.shape[1]
    mel_loss = ((out - b["mel"]) ** 2 * b["mask"]).sum() / n
    f0_loss = ((spk.f0_mean - f0_targets[:, 0]) ** 2).mean() + ((torch.log(spk.f0_std) -
                                                                   torch.log(f0_targets[:, 1])) ** 2).mean()
    base = prior.base_mean(b["mean"], b["mask"], spk, (b["src_mean"], b["src_std"]))
    base_loss = ((base.clamp_min(math.log(1e-5)) - b["mel"]) ** 2 * b["mask"]).sum() / n
    return {"mel": mel_loss, "f0": f0_loss, "base": base_loss.detach()}


def _encoder(init: Path) -> DiffVC:
    model = DiffVC.from_config(MINI_CONFIG)
    model.load_state_dict(torch.load(init, weights_only=True)["state_dict"])
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _room_means(b: dict[str, torch.Tensor], share: float, rng: random.Random, model: DiffVC) -> dict[str, torch.Tensor]:
    """Re-encode a random `share` of the crops from their mel through a simulated room (`cloak.train.rooms`); the
    normalisation statistics of those crops are then their own (as for a conversion of that recording)."""
    pick = [i for i in range(b["mel"].shape[0]) if rng.random() < share]
    if not pick:
        return b
    mels = torch.stack([random_room(b["mel"][i], b["mask"][i], rng) for i in pick])
    masks = b["mask"][pick]
    means = model.average_voice(mels, masks) * masks
    m, s = SpeakerPrior.source_stats(means, masks)
    out = {k: b[k].clone() for k in ("mean", "src_mean", "src_std")}
    out["mean"][pick], out["src_mean"][pick], out["src_std"][pick] = means, m, s
    return b | out


def fit_units(feats: list[dict], rows: list[int], k: int, seed: int, frames: int = 120_000,
              iters: int = 25) -> torch.Tensor:
    """k-means (k, 80) of the per-utterance normalised average-voice means of `rows` (a random subset of their
    frames), initialised from k random frames; deterministic given the seed."""
    g = torch.Generator().manual_seed(seed)
    zs = []
    for i in rows:
        mu = feats[i]["mean"]
        m, s = SpeakerPrior.source_stats(mu[None], torch.ones(1, 1, mu.shape[1]))
        zs.append(((mu - m[0][:, None]) / s[0][:, None]).T)
    z = torch.cat(zs)
    z = z[torch.randperm(z.shape[0], generator=g)[:frames]]
    c = z[torch.randperm(z.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        idx = torch.cdist(z, c).argmin(-1)
        sums = torch.zeros_like(c).index_add_(0, idx, z)
        counts = torch.bincount(idx, minlength=k).float()[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def train_prior(items: list[dict], feats: list[dict], cache: Path, st: PriorSettings, budget_s: float,
                init: Path, prior_init: Path | None = None) -> None:
    """`prior_init`: a cloak-mini-2 checkpoint whose prior to start from (fine-tuning) instead of a fresh one."""
    ckpt_path = cache / "prior.pt"
    train_items = [it for it in items if it["split"] == "train"]
    by_spk: dict[str, list[torch.Tensor]] = defaultdict(list)
    for it in train_items:
        by_spk[it["speaker"]].append(it["mel"])
    stats = {s: speaker_stats(m) for s, m in by_spk.items()}
    spk_f0 = _speaker_f0(items, feats)
    torch.manual_seed(st.seed)
    prior = SpeakerPrior(PriorConfig(n_units=st.n_units))
    prior.avg_mean.copy_(torch.stack([m for m, _ in stats.values()]).mean(0))
    prior.avg_std.copy_(torch.stack([s for _, s in stats.values()]).mean(0))
    if prior_init is not None:
        res = prior.load_state_dict(torch.load(prior_init, weights_only=True)["prior_state_dict"], strict=False)
        if res.unexpected_keys or set(res.missing_keys) - {"units"}:  # only the units may be new
            raise ValueError(f"{prior_init}: prior does not match: {res}")
    if st.n_units:
        train_rows = [i for i, it in enumerate(items) if it["split"] == "train"]
        prior.units.copy_(fit_units(feats, train_rows, st.n_units, st.seed))
    encoder = _encoder(init) if st.source_rooms else None
    opt = torch.optim.Adam(prior.parameters(), lr=st.prior_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, st.prior_steps)
                                                                                / st.prior_steps)))
    batches = Batches(items, feats, "train", st.seed)
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        prior.load_state_dict(ck["prior"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step = ck["step"]
        batches.rng.setstate(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
    if step >= st.prior_steps:
        return
    val = Batches(items, feats, "val_seen", st.seed + 1)
    val_unseen = Batches(items, feats, "val_unseen", st.seed + 2)
    fixed_val = [val.sample(32, st.prior_frames, 256)[0] for _ in range(2)] + \
        [val_unseen.sample(32, st.prior_frames, 256)[0] for _ in range(2)]
    t0 = time.time()
    logf = open(cache / "prior_log.jsonl", "a")
    prior.train()
    while step < st.prior_steps and time.time() - t0 < budget_s:
        ref_frames = batches.rng.randrange(*st.ref_frames)
        b, spk_names = batches.sample(st.prior_batch, st.prior_frames, ref_frames)
        if encoder is not None:
            b = _room_means(b, st.source_rooms, batches.rng, encoder)
        if st.mean_warp:
            b = _warp_means(b, st.mean_warp, batches.rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.bf16):
            losses = _prior_loss(prior, b, torch.tensor([spk_f0[s] for s in spk_names]))
        optimizer_step(prior, opt, losses["mel"] + 0.5 * losses["f0"])
        sched.step()
        step += 1
        if step % 25 == 0:
            rec = {"step": step, "t": round(time.time() - t0, 1)} | {k: round(v.item(), 4) for k, v in losses.items()}
            if step % st.ckpt_every == 0 or step == st.prior_steps:
                rec |= _validate(prior, fixed_val)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log.info("prior %s", rec)
        if step % st.ckpt_every == 0 or step == st.prior_steps:
            save_atomic(ckpt_path, {"prior": prior.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                              "step": step, "rng": batches.rng.getstate(), "torch_rng": torch.get_rng_state(),
                              "config": prior.config.to_dict()})


def _warp_means(b: dict[str, torch.Tensor], max_warp: float, rng: random.Random) -> dict[str, torch.Tensor]:
    """Warp each crop's mean along the mel axis; its normalisation statistics are then taken from the warped crop."""
    means = torch.stack([perturb_mean(mu, m, rng, max_warp=max_warp, max_gain=0.0)
                         for mu, m in zip(b["mean"], b["mask"], strict=True)])
    src_mean, src_std = SpeakerPrior.source_stats(means, b["mask"])
    return b | {"mean": means, "src_mean": src_mean, "src_std": src_std}


@torch.no_grad()
def _validate(prior: SpeakerPrior, fixed: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    prior.eval()
    out = {}
    for name, bs in (("val_seen", fixed[:2]), ("val_unseen", fixed[2:])):
        mel = base = 0.0
        for b in bs:
            spk = prior.condition(b["c"], b["ref_mel"], b["ref_mask"])
            stats = (b["src_mean"], b["src_std"])
            o = prior(b["mean"], b["mask"], b["log_f0"], b["voiced"], spk, stats)
            n = b["mask"].sum() * o.shape[1]
            mel += float(((o - b["mel"]) ** 2 * b["mask"]).sum() / n) / len(bs)
            bb = prior.base_mean(b["mean"], b["mask"], spk, stats).clamp_min(math.log(1e-5))
            base += float(((bb - b["mel"]) ** 2 * b["mask"]).sum() / n) / len(bs)
        out[f"{name}_mel"] = round(mel, 4)
        out[f"{name}_base"] = round(base, 4)
    prior.train()
    return out


def load_prior(cache: Path) -> SpeakerPrior:
    ck = torch.load(cache / "prior.pt", weights_only=False)
    prior = SpeakerPrior(PriorConfig.from_dict(ck["config"]))
    prior.load_state_dict(ck["prior"])
    return prior.eval()


def train_decoder(items: list[dict], feats: list[dict], cache: Path, st: PriorSettings, budget_s: float,
                  init: Path) -> None:
    """Fine-tune the shipped decoder on prior means (official loss, t ~ U(0, 1)), EMA of the weights."""
    ckpt_path = cache / "decoder2.pt"
    prior = load_prior(cache).requires_grad_(False)
    model = DiffVC.from_config(MINI_CONFIG)
    model.load_state_dict(torch.load(init, weights_only=True)["state_dict"])
    dec = model.decoder
    opt = torch.optim.Adam(dec.parameters(), lr=st.dec_lr)
    gen = torch.Generator().manual_seed(st.seed + 7)
    batches = Batches(items, feats, "train", st.seed + 3)
    step = 0
    ema = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        dec.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        gen.set_state(ck["gen"])
        batches.rng.setstate(ck["rng"])
        ema = ck["ema"]
    if ema is None:
        ema = {k: v.detach().clone() for k, v in dec.state_dict().items()}
    if step >= st.dec_steps:
        return
    dec.train()
    t0 = time.time()
    logf = open(cache / "decoder2_log.jsonl", "a")
    run = None
    while step < st.dec_steps and time.time() - t0 < budget_s:
        ref_frames = batches.rng.randrange(*st.ref_frames)
        b, _ = batches.sample(st.dec_batch, st.dec_frames, ref_frames)
        if st.source_rooms:
            b = _room_means(b, st.source_rooms, batches.rng, model)
        with torch.no_grad():
            spk = prior.condition(b["c"], b["ref_mel"], b["ref_mask"])
            mu = prior(b["mean"], b["mask"], b["log_f0"], b["voiced"], spk, (b["src_mean"], b["src_std"]))
            ref, rmask = b["ref_mel"][..., :st.dec_frames], b["ref_mask"][..., :st.dec_frames]
            mean_ref = model.average_voice(ref, rmask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.bf16):
            loss = model.compute_loss(b["mel"] * b["mask"], b["mask"], mu, ref * rmask, mean_ref, b["c"],
                                      generator=gen)
        optimizer_step(dec, opt, loss, ema, st.ema_decay)
        step += 1
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 25 == 0:
            logf.write(json.dumps({"step": step, "loss": loss.item(), "avg": run, "t": time.time() - t0}) + "\n")
            logf.flush()
        if step % st.ckpt_every == 0 or step == st.dec_steps:
            save_atomic(ckpt_path, {"decoder": dec.state_dict(), "opt": opt.state_dict(), "step": step,
                              "gen": gen.get_state(), "ema": ema, "rng": batches.rng.getstate()})
            log.info("decoder step %d loss %.4f (avg %.4f)", step, loss.item(), run)


def export(cache: Path, out: Path, st: PriorSettings, init: Path, use_ema: bool = True) -> Path:
    base = torch.load(init, weights_only=True)
    model = DiffVC.from_config(MINI_CONFIG)
    model.load_state_dict(base["state_dict"])
    dec_steps = 0
    if (cache / "decoder2.pt").exists():
        dec = torch.load(cache / "decoder2.pt", weights_only=False)
        model.decoder.load_state_dict(dec["ema"] if use_ema else dec["decoder"])
        dec_steps = dec["step"]
    prior_ck = torch.load(cache / "prior.pt", weights_only=False)
    meta = dict(base["meta"]) | {"name": "cloak-mini", "format": FORMAT, "prior_steps": prior_ck["step"],
                                 "decoder_finetune_steps": dec_steps,
                                 "decoder_weights": "ema" if use_ema and dec_steps else "raw",
                                 "prior_settings": {k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in asdict(st).items()},
                                 "val_speakers": list(VAL_SPEAKERS)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    prior_config = PriorConfig.from_dict(prior_ck["config"]).to_dict() | {"vtl_exponent": st.vtl_exponent}
    save_atomic(out, {"format": FORMAT, "config": MINI_CONFIG.to_dict(), "state_dict": state,
                "prior_config": prior_config, "prior_state_dict": prior_ck["prior"], "meta": meta})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="runs/mini", help="the directory `cloak.train.mini --stage prepare` filled")
    p.add_argument("--items", default=None, help="prepared data (data.pt or a pack); default CACHE/data.pt")
    p.add_argument("--stage", choices=["features", "prior", "decoder", "export", "all"], default="all")
    p.add_argument("--init", default=str(EMBEDDED), help="cloak-mini checkpoint whose encoder and decoder to start "
                   "from (its DiffVC part; default: the shipped one, i.e. fine-tuning continues from version 2; "
                   "the recipe as measured started from version 1, `git show 7ca221f:cloak/data/cloak-mini.pt`)")
    p.add_argument("--hours", type=float, default=2.0, help="wall-time budget of this run")
    p.add_argument("--prior-steps", type=int, default=PriorSettings.prior_steps)
    p.add_argument("--dec-steps", type=int, default=PriorSettings.dec_steps)
    p.add_argument("--mean-warp", type=float, default=PriorSettings.mean_warp)
    p.add_argument("--source-rooms", type=float, default=PriorSettings.source_rooms,
                   help="share of source crops put through a simulated room before the encoder (0 = off)")
    p.add_argument("--prior-init", default=None, help="a cloak-mini-2 checkpoint whose prior to fine-tune from")
    p.add_argument("--units", type=int, default=PriorSettings.n_units,
                   help="pseudo-phone units of the source's normalised mean (k-means; 0 = off)")
    p.add_argument("--prior-lr", type=float, default=PriorSettings.prior_lr)
    p.add_argument("--seed", type=int, default=PriorSettings.seed,
                   help="initialisation, unit k-means and data order (another seed gives an independent attacker, "
                        "e.g. a transfer attacker for `cloak evaluate`)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="exported checkpoint (default CACHE/cloak-mini.pt)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    st = PriorSettings(seed=a.seed, prior_steps=a.prior_steps, dec_steps=a.dec_steps, mean_warp=a.mean_warp,
                       source_rooms=a.source_rooms, prior_lr=a.prior_lr,
                       n_units=a.units, bf16=cpu_has_native_bf16())
    cache = Path(a.cache)
    t_end = time.time() + a.hours * 3600
    items = load_items(Path(a.items) if a.items else cache / "data.pt", 0)
    init = Path(a.init)
    feats = torch.load(compute_features(items, cache, init), weights_only=False)["rows"]
    if a.stage in ("prior", "all"):
        train_prior(items, feats, cache, st, t_end - time.time(), init,
                    Path(a.prior_init) if a.prior_init else None)
    if a.stage in ("decoder", "all"):
        train_decoder(items, feats, cache, st, t_end - time.time(), init)
    if a.stage in ("export", "all"):
        log.info("exported %s", export(cache, Path(a.out or cache / "cloak-mini.pt"), st, init))


if __name__ == "__main__":
    main()
