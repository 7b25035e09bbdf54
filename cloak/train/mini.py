"""Train cloak-mini: DiffVC's architecture at reduced width on the project's open speech corpora.

Stages (each resumable, each deterministic given the seed):
  prepare  resample every utterance to 22.05 kHz once, cache log-mels and GE2E d-vectors, make the split;
  encoder  MelEncoder + PostNet regress the "average voice" substitute target (see targets.py);
  means    cache encoder outputs for every utterance;
  decoder  score-matching training of the U-Net with the official conditioning (GE2E d-vector of the
           reference + RefBlock on the diffused reference mel + time embedding), bf16 autocast on CPU;
  export   write the shipped checkpoint {config, state_dict, meta}.

Validation split: three speakers of shared/corpus never seen in training, plus one utterance of every
training speaker (the last one; for speakers with a single utterance, its last 15 % of frames).
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
import soundfile as sf
import torch

from ..corpus import list_speakers
from ..cpu import cpu_has_native_bf16
from ..features import DIFFVC_RATE, GE2E_RATE, diffvc_mel, resample
from ..files import replace_atomically
from ..models.diffvc import DiffVC, DiffVCConfig
from ..models.ge2e import GE2E, volume_gain
from .targets import average_voice_target, speaker_stats

log = logging.getLogger("cloak.train")

MINI_CONFIG = DiffVCConfig(n_feats=80, channels=128, filters=512, heads=2, layers=4, kernel=3, dropout=0.1,
                           window_size=4, enc_dim=16, spk_dim=32, use_ref_t=True, dec_dim=32,
                           beta_min=0.05, beta_max=20.0)
VAL_SPEAKERS = ("vctk_p225", "librispeech_3080", "librispeech_2414")  # F, F, M; from shared/corpus


@dataclass
class TrainSettings:
    seed: int = 1234
    enc_steps: int = 1000
    enc_batch: int = 8
    enc_frames: int = 128
    enc_lr: float = 5e-4
    dec_steps: int = 40000
    dec_batch: int = 8
    dec_frames: int = 64
    dec_lr: float = 2e-4
    ckpt_every: int = 250
    perturb_mean: bool = True
    # from this decoder step on, the mean's timbre is randomised much harder (wider warp, random spectral tilt and
    # envelope): at step 2,500 the decoder still ignored the d-vector and the RefBlock (clones of one source with
    # three different references were 0.99-1.00 GE2E-identical; the score moved ~1 % when c changed)
    strong_mean_from: int = 2500
    # from this decoder step on, half of every batch draws t from [0.6, 1) instead of [0, 1): the voice of a
    # conversion is decided at large t (x_t is then mostly the source's mean plus noise), where x_t no longer shows
    # the target's timbre and only c / the RefBlock can tell it; under U(0, 1) those times are rare and their loss
    # share small, so the decoder learnt to read the voice off x_t instead
    late_t_from: int = 3250
    # ... and those samples' loss is weighted by var(t) / gamma(t)^2 (the epsilon loss turned into an x_0 loss),
    # capped at this: the epsilon loss at large t is ~0.005 and hardly depends on x_0, so without the weight the
    # c -> voice mapping gets almost no gradient (measured at step 3,750: the right vs a shuffled d-vector changed
    # the late-t loss by 0.5 %). Every weighting has the same optimum, the true score; it moves only the emphasis.
    late_t_weight_cap: float = 20.0
    # from this decoder step on, the loss also asks for the right long-term spectrum of the x_0 the score implies
    # (`loss_t(spectrum_weight=...)`, weight var/gamma^2 capped at spectrum_weight_cap) and the late half of each
    # batch moves to t in [0.45, 0.9), where a conversion commits to its timbre: at step 7,000 the eps loss still
    # hardly cared for c (a shuffled d-vector raised the late-t loss 0.8-2 %), because the speaker-specific part of
    # the error, its time-mean per mel bin, is a sliver of the per-bin squared error. Same optimum, new emphasis.
    spectrum_from: int = 7000
    spectrum_weight_cap: float = 300.0
    ema_decay: float = 0.999  # exported decoder = exponential moving average of the weights (steadier samples)
    bf16: bool = False  # only where the CPU has native bf16 (AMX / AVX512-BF16); emulated bf16 is ~20x slower


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
def prepare(roots: list[Path], cache: Path) -> Path:
    out = cache / "data.pt"
    if out.exists():
        return out
    ge2e = GE2E.load()
    items = []
    for root in roots:
        for spk in list_speakers(root):
            held_out_speaker = spk.name in VAL_SPEAKERS
            for k, f in enumerate(spk.files):
                x, sr = sf.read(str(f), dtype="float32", always_2d=True)
                x = torch.from_numpy(x.mean(1))
                with torch.no_grad():
                    w22 = resample(x, sr, DIFFVC_RATE)
                    mel = diffvc_mel(w22[None])[0]
                    w16 = resample(x, sr, GE2E_RATE)
                    dvec = ge2e.embed(w16[None] * volume_gain(w16))[0]
                last = k == len(spk.files) - 1
                if held_out_speaker:
                    split = [("val_unseen", 0, mel.shape[1])]
                elif len(spk.files) > 1:
                    split = [("val_seen" if last else "train", 0, mel.shape[1])]
                else:
                    cut = int(mel.shape[1] * 0.85)
                    split = [("train", 0, cut), ("val_seen", cut, mel.shape[1])]
                for name, a, b in split:
                    items.append({"speaker": spk.name, "sex": spk.sex, "file": str(f), "split": name,
                                  "mel": mel[:, a:b].clone(), "dvec": dvec.clone()})
            log.info("prepared %s (%d files)", spk.name, len(spk.files))
    cache.mkdir(parents=True, exist_ok=True)
    save_atomic(out, items)
    return out


PACK_LO, PACK_HI = math.log(1e-5), 4.0  # log-mel range stored by `pack` (8 bits: steps of 0.06 nats)


def pack(items: list[dict], out: Path) -> Path:
    """A compact copy of the prepared data (log-mels as 8-bit codes, d-vectors fp16) small enough to travel to a
    GPU machine with the code (~30 MB for the project's corpora); `load_items` reads both formats."""
    rows = []
    for it in items:
        q = ((it["mel"].clamp(PACK_LO, PACK_HI) - PACK_LO) / (PACK_HI - PACK_LO) * 255).round().to(torch.uint8)
        rows.append({k: it[k] for k in ("speaker", "sex", "split")} | {"mel_q": q, "dvec": it["dvec"].half()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(out, {"format": "cloak-mini-pack-1", "lo": PACK_LO, "hi": PACK_HI, "items": rows})
    return out


def load_items(path: Path, seed: int = 0) -> list[dict]:
    """Prepared items from `prepare`'s data.pt or from a `pack` file (decoded with a fixed uniform dither of one
    code step, so the training data stays continuous)."""
    obj = torch.load(path, weights_only=False)
    if isinstance(obj, list):
        return obj
    if obj.get("format") != "cloak-mini-pack-1":
        raise ValueError(f"{path}: neither prepared data nor a cloak-mini pack")
    step = (obj["hi"] - obj["lo"]) / 255
    gen = torch.Generator().manual_seed(seed)
    items = []
    for r in obj["items"]:
        q = r["mel_q"].float()
        mel = obj["lo"] + step * (q + torch.rand(q.shape, generator=gen) - 0.5)
        items.append({k: r[k] for k in ("speaker", "sex", "split")} | {"mel": mel, "dvec": r["dvec"].float()})
    return items


def _crop(mel: torch.Tensor, frames: int, rng: random.Random) -> tuple[torch.Tensor, int, int]:
    t = mel.shape[1]
    if t >= frames:
        a = rng.randrange(0, t - frames + 1)
        return mel[:, a:a + frames], a, frames
    pad = torch.full((mel.shape[0], frames - t), math.log(1e-5))
    return torch.cat([mel, pad], 1), 0, t


def save_atomic(path: Path, obj: Any) -> None:
    """torch.save through a partial file and a rename: a stopped run never leaves a torn checkpoint."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def optimizer_step(module: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                   ema: dict[str, torch.Tensor] | None = None, ema_decay: float = 0.999) -> None:
    """One training step: backward, gradient clipping at norm 1, the optimiser's step, then the exponential moving
    average of the weights (floating-point entries of the state dict) when `ema` is given."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1.0 - ema_decay)


def _rng_state() -> dict:
    return {"py": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["py"])
    np.random.set_state(s["np"])
    torch.set_rng_state(s["torch"])


# --------------------------------------------------------------------------------------------------------
def train_encoder(items: list[dict], cache: Path, st: TrainSettings, budget_s: float) -> None:
    ckpt_path = cache / "encoder.pt"
    train = [it for it in items if it["split"] == "train"]
    by_spk: dict[str, list[torch.Tensor]] = {}
    for it in train:
        by_spk.setdefault(it["speaker"], []).append(it["mel"])
    stats = {s: speaker_stats(m) for s, m in by_spk.items()}
    glob_mean = torch.stack([m for m, _ in stats.values()]).mean(0)
    glob_std = torch.stack([s for _, s in stats.values()]).mean(0)
    targets = [average_voice_target(it["mel"], *stats[it["speaker"]], glob_mean, glob_std) for it in train]

    _seed_all(st.seed)  # before building the model: its initial weights are part of the run
    model = DiffVC.from_config(MINI_CONFIG)
    enc = model.encoder
    opt = torch.optim.Adam(enc.parameters(), lr=st.enc_lr)
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        enc.load_state_dict(ck["encoder"])
        if ck["opt"] is not None:
            opt.load_state_dict(ck["opt"])
        step = ck["step"]
        _set_rng_state(ck["rng"])
    if step >= st.enc_steps:
        return
    rng = random.Random(st.seed + step)
    if ckpt_path.exists() and "crop_rng" in ck:  # resume the crop stream exactly where it stopped
        rng.setstate(ck["crop_rng"])
    weights = [it["mel"].shape[1] for it in train]
    enc.train()
    t0 = time.time()
    logf = open(cache / "encoder_log.jsonl", "a")
    while step < st.enc_steps and time.time() - t0 < budget_s:
        idx = rng.choices(range(len(train)), weights=weights, k=st.enc_batch)
        xs, ys, ms = [], [], []
        for i in idx:
            mel = train[i]["mel"]
            x, a, n = _crop(mel, st.enc_frames, rng)
            y, _, _ = _crop(targets[i][:, a:a + st.enc_frames] if mel.shape[1] >= st.enc_frames else targets[i],
                            st.enc_frames, random.Random(0))
            m = torch.zeros(1, st.enc_frames)
            m[:, :n] = 1
            xs.append(x)
            ys.append(y)
            ms.append(m)
        x, y, m = torch.stack(xs), torch.stack(ys), torch.stack(ms)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=st.bf16):
            loss = enc.compute_loss(x, y, m)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            logf.write(json.dumps({"step": step, "loss": loss.item(), "t": time.time() - t0}) + "\n")
            logf.flush()
        if step % st.ckpt_every == 0 or step == st.enc_steps:
            save_atomic(ckpt_path, {"encoder": enc.state_dict(), "opt": opt.state_dict(), "step": step,
                              "rng": _rng_state(), "crop_rng": rng.getstate(), "glob_mean": glob_mean,
                              "glob_std": glob_std})
            log.info("encoder step %d loss %.4f", step, loss.item())


def compute_means(items: list[dict], cache: Path, device: str = "cpu") -> Path:
    out = cache / "means.pt"
    if out.exists():
        return out
    model = DiffVC.from_config(MINI_CONFIG)
    model.encoder.load_state_dict(torch.load(cache / "encoder.pt", weights_only=False, map_location="cpu")["encoder"])
    model.eval().to(device)
    means = []
    with torch.no_grad():
        for it in items:
            mel = it["mel"][None].to(device)
            means.append(model.average_voice(mel, torch.ones(1, 1, mel.shape[-1], device=device))[0].cpu().clone())
    save_atomic(out, {"means": means})
    return out


def perturb_mean(mean: torch.Tensor, mask: torch.Tensor, rng: random.Random, max_warp: float = 0.15,
                 max_gain: float = 1.0, max_tilt: float = 0.0, max_env: float = 0.0) -> torch.Tensor:
    """Information perturbation of the encoder mean for decoder training: a random warp of the mel axis
    (vocal-tract length), a random level offset and, when asked, a random spectral tilt (up to +-max_tilt nats at
    the band edges) and a random smooth envelope (DCT-1..3 of the mel axis, each up to +-max_env nats). In
    training the mean comes from the target utterance itself, so without this the decoder learns to take the voice
    from the mean; with it, the voice has to come from the d-vector and the RefBlock, as at conversion time, where
    the mean belongs to another speaker."""
    n = mean.shape[0]
    alpha = 1.0 + rng.uniform(-max_warp, max_warp)
    pos = (torch.arange(n, dtype=mean.dtype) * alpha).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.to(mean.dtype))[:, None]
    warped = mean[lo] * (1 - w) + mean[hi] * w
    offset = torch.full((n,), rng.uniform(-max_gain, max_gain), dtype=mean.dtype)
    if max_tilt or max_env:
        bins = torch.arange(n, dtype=mean.dtype)
        offset = offset + rng.uniform(-max_tilt, max_tilt) * torch.linspace(-1, 1, n, dtype=mean.dtype)
        for k in (1, 2, 3):
            offset = offset + rng.uniform(-max_env, max_env) * torch.cos(math.pi * k * (bins + 0.5) / n)
    return (warped + offset.to(mean.device)[:, None]) * mask


STRONG_PERTURBATION = {"max_warp": 0.25, "max_gain": 1.0, "max_tilt": 1.5, "max_env": 0.75}


def decoder_example(mel: torch.Tensor, mean: torch.Tensor, frames: int, rng: random.Random,
                    perturb: dict | None) -> tuple[torch.Tensor, ...]:
    """One decoder training example from an utterance's mel and encoder mean: a crop (target), another crop of the
    same utterance (reference), the crop's mean perturbed by `perturb_mean(**perturb)` (None: unperturbed), and the
    crop's mask. Returns (x, mean, ref, mean_ref, mask)."""
    both = torch.cat([mel, mean], 0)
    n_feats = mel.shape[0]
    x, _, n = _crop(both, frames, rng)
    r, _, _ = _crop(both, frames, rng)
    m = torch.zeros(1, frames)
    m[:, :n] = 1
    mu = perturb_mean(x[n_feats:], m, rng, **perturb) if perturb is not None else x[n_feats:] * m
    return x[:n_feats], mu, r[:n_feats], r[n_feats:] * m, m


def train_decoder(items: list[dict], cache: Path, st: TrainSettings, budget_s: float,
                  init: Path | None = None, device: str = "cpu") -> None:
    ckpt_path = cache / "decoder.pt"
    means = torch.load(cache / "means.pt", weights_only=False)["means"]
    train = [(it, mu) for it, mu in zip(items, means, strict=True) if it["split"] == "train"]
    _seed_all(st.seed + 1)  # the decoder's initial weights are part of the run
    model = DiffVC.from_config(MINI_CONFIG)
    model.encoder.load_state_dict(torch.load(cache / "encoder.pt", weights_only=False)["encoder"])
    dev = torch.device(device)
    model.to(dev)
    dec = model.decoder
    opt = torch.optim.Adam(dec.parameters(), lr=st.dec_lr)
    step = 0
    gen = torch.Generator(device=dev).manual_seed(st.seed)
    ema: dict[str, torch.Tensor] | None = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=dev)
        dec.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        try:
            gen.set_state(ck["gen"].cpu())
        except RuntimeError:  # a checkpoint from another kind of device: continue with a re-seeded stream
            gen.manual_seed(st.seed + step)
        ema = ck.get("ema")  # checkpoints from before the EMA start it from their weights
    elif init is not None and init.is_file():  # continue from a shipped checkpoint (fresh optimiser state)
        ck = torch.load(init, weights_only=True, map_location=dev)
        model.load_state_dict(ck["state_dict"])
        step = int(ck["meta"].get("decoder_steps", 0))
        gen.manual_seed(st.seed + step)
        log.info("decoder initialised from %s at step %d", init, step)
    if ema is None:
        ema = {k: v.detach().clone() for k, v in dec.state_dict().items()}
    if step >= st.dec_steps:
        return
    rng = random.Random(st.seed * 7 + step)
    if ckpt_path.exists() and "rng" in ck:  # resume the crop/perturbation stream exactly where it stopped
        rng.setstate(ck["rng"])
    weights = [it["mel"].shape[1] for it, _ in train]
    dec.train()
    t0 = time.time()
    logf = open(cache / "decoder_log.jsonl", "a")
    run_loss = None
    while step < st.dec_steps and time.time() - t0 < budget_s:
        idx = rng.choices(range(len(train)), weights=weights, k=st.dec_batch)
        xs, mus, refs, mrefs, ms, cs = [], [], [], [], [], []
        for i in idx:
            it, mu = train[i]
            strong = STRONG_PERTURBATION if step >= st.strong_mean_from else {}
            x, mu, r, mr, m = decoder_example(it["mel"], mu, st.dec_frames, rng, strong if st.perturb_mean else None)
            xs.append(x)
            mus.append(mu)
            refs.append(r)
            mrefs.append(mr)
            ms.append(m)
            cs.append(it["dvec"])
        x, mu, ref, mref = (torch.stack(v).to(dev) for v in (xs, mus, refs, mrefs))
        m, c = torch.stack(ms).to(dev), torch.stack(cs).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=st.bf16):
            if step >= st.late_t_from:
                t = torch.rand(x.shape[0], generator=gen, dtype=x.dtype, device=dev).clamp(1e-5, 1 - 1e-5)
                spectrum = step >= st.spectrum_from
                t[::2] = 0.45 + 0.45 * t[::2] if spectrum else 0.6 + 0.4 * t[::2]
                x0_weight = (dec.variance(t) / dec.get_gamma(0, t) ** 2).flatten()
                w = x0_weight.clamp(1.0, st.late_t_weight_cap)
                sw = x0_weight.clamp(max=st.spectrum_weight_cap) if spectrum else None
                loss = model.decoder.loss_t(x * m, m, mu, ref * m, mref, c, t, generator=gen, weight=w,
                                            spectrum_weight=sw)
            else:  # the official t ~ U(0, 1)
                loss = model.compute_loss(x * m, m, mu, ref * m, mref, c, generator=gen)
        optimizer_step(dec, opt, loss, ema, st.ema_decay)
        step += 1
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if step % 25 == 0:
            logf.write(json.dumps({"step": step, "loss": loss.item(), "avg": run_loss,
                                   "t": time.time() - t0}) + "\n")
            logf.flush()
        if step % st.ckpt_every == 0 or step == st.dec_steps:
            save_atomic(ckpt_path, {"decoder": dec.state_dict(), "opt": opt.state_dict(), "step": step,
                              "gen": gen.get_state(), "ema": ema, "rng": rng.getstate()})
            log.info("decoder step %d loss %.4f (avg %.4f)", step, loss.item(), run_loss)


def export(cache: Path, out: Path, st: TrainSettings, ema: bool = True) -> Path:
    model = DiffVC.from_config(MINI_CONFIG)
    enc = torch.load(cache / "encoder.pt", weights_only=False)
    dec = torch.load(cache / "decoder.pt", weights_only=False)
    model.encoder.load_state_dict(enc["encoder"])
    use_ema = ema and dec.get("ema") is not None
    model.decoder.load_state_dict(dec["ema"] if use_ema else dec["decoder"])
    meta = {"name": "cloak-mini", "encoder_steps": enc["step"], "decoder_steps": dec["step"],
            "decoder_weights": "ema" if use_ema else "raw",
            "settings": asdict(st), "val_speakers": list(VAL_SPEAKERS)}
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_atomic(out, {"config": MINI_CONFIG.to_dict(), "state_dict": state, "meta": meta})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n"
                                "  python -m cloak.train.mini --hours 4 --threads 2            CPU recipe, resumable\n"
                                "  python -m cloak.train.mini --stage pack --pack runs/pack.pt  data for a GPU box\n"
                                "  python -m cloak.train.mini --items runs/pack.pt --cache runs/gpu --device cuda \\\n"
                                "      --init cloak/data/cloak-mini.pt --dec-batch 64 --dec-frames 128 --hours 0.15")
    p.add_argument("--data", nargs="+", default=["../shared/corpus-train", "../shared/corpus"])
    p.add_argument("--cache", default="runs/mini")
    p.add_argument("--stage", choices=["prepare", "pack", "encoder", "means", "decoder", "export", "all"],
                   default="all")
    p.add_argument("--hours", type=float, default=6.0, help="wall-time budget of this run")
    p.add_argument("--out", default="runs/mini/cloak-mini.pt")
    p.add_argument("--dec-steps", type=int, default=TrainSettings.dec_steps)
    p.add_argument("--dec-batch", type=int, default=TrainSettings.dec_batch)
    p.add_argument("--dec-frames", type=int, default=TrainSettings.dec_frames)
    p.add_argument("--dec-lr", type=float, default=TrainSettings.dec_lr)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the decoder and the means run there)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--pack", default=None, help="with --stage pack: write the compact data file here")
    p.add_argument("--items", default=None, help="train from a pack file (or a data.pt) instead of preparing "
                   "the corpora (on a machine without them)")
    p.add_argument("--init", default=None, help="continue the decoder from this exported checkpoint when the "
                   "cache has no decoder state (e.g. cloak/data/cloak-mini.pt on a fresh machine)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    bf16 = cpu_has_native_bf16() if dev.type == "cpu" else dev.type == "cuda" and torch.cuda.is_bf16_supported()
    st = TrainSettings(dec_steps=a.dec_steps, dec_batch=a.dec_batch, dec_frames=a.dec_frames, dec_lr=a.dec_lr,
                       bf16=bf16)
    log.info("settings %s device %s", st, dev)
    cache = Path(a.cache)
    t_end = time.time() + a.hours * 3600
    data = Path(a.items) if a.items else prepare([Path(r) for r in a.data], cache)
    if a.stage == "prepare":
        return
    items = load_items(data, st.seed)
    if a.stage == "pack":
        log.info("packed %s", pack(items, Path(a.pack or cache / "pack.pt")))
        return
    cache.mkdir(parents=True, exist_ok=True)
    if a.init and not (cache / "encoder.pt").exists():  # the decoder must keep the encoder it was trained with
        ck = torch.load(a.init, weights_only=True)
        model = DiffVC.from_config(MINI_CONFIG)
        model.load_state_dict(ck["state_dict"])
        save_atomic(cache / "encoder.pt", {"encoder": model.encoder.state_dict(), "opt": None, "step": st.enc_steps,
                                     "rng": _rng_state()})
    if a.stage in ("encoder", "all"):
        train_encoder(items, cache, st, t_end - time.time())
    if a.stage in ("means", "all"):
        compute_means(items, cache, a.device)
    if a.stage in ("decoder", "all"):
        train_decoder(items, cache, st, t_end - time.time(), Path(a.init) if a.init else None, a.device)
    if a.stage in ("export", "all"):
        log.info("exported %s", export(cache, Path(a.out), st))


if __name__ == "__main__":
    main()
