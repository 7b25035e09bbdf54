"""Expectation over transformation (EOT) inside the PGD loop: what may happen to a published recording before a
cloner reads it, drawn anew every step and applied to the protected window before the models see it, so that the
perturbation is optimised for the recording as the attacker gets it, not only as it leaves the tool.

    mp3       an MP3 round trip (cloak.mp3; LAME CBR at 64, 96 or 128 kb/s, drawn) at the codec rate: the job's
              own rate when LAME encodes at it and it is at least 22.05 kHz (`codec_rate`), else 44.1 kHz.
              The codec is not differentiable, so its gradient is taken as the identity's (BPDA,
              straight-through): the models see the decoded audio and the step is computed at that point.
    resample  to 16 kHz and back with the engine's resampler (differentiable): what speech tools and many
              platforms do. 44.1 and 48 kHz are not drawn: the delivered file is at the user's rate already, and
              the attacker's own resampling to 22.05 kHz is the path the engine computes through.
    gain      a level change uniform in +-3 dB (differentiable). The attacker's GE2E normalises volume, so its
              input gain is that of the changed level (RTVC `normalize_volume`, increase only).

Each PGD step of a window draws one of "none" and the configured transforms, uniformly: the untouched file stays
one of the cases the perturbation is optimised for. The draws come from the window's seeded generator after
everything else the window draws, so a job without EOT draws exactly what it did before, and a one-thread CPU
run with EOT is as reproducible as one without.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .audio import to_rate
from .config import EOT_NAMES
from .features import DIFFVC_RATE, resample
from .models.ge2e import volume_gain
from .mp3 import MP3_RATES, fit_length, mp3_roundtrip

MP3_KBPS: tuple[int, ...] = (64, 96, 128)
MP3_DEFAULT_RATE = 44_100
RESAMPLE_RATE = 16_000
GAIN_DB = 3.0


@dataclass(frozen=True)
class Draw:
    """One step's transform: `name` ("none" or one of EOT_NAMES) and its parameter (kb/s, Hz or linear gain)."""

    name: str
    value: float = 0.0
    ge2e_gain: float | None = None  # gain: the GE2E input gain at the changed level (`with_ge2e_gains`)


def draw_plan(names: tuple[str, ...], steps: int, gen: torch.Generator) -> list[Draw]:
    """The transform of each of `steps` PGD steps: uniform over "none" and `names` (empty: no draw at all)."""
    if not names:
        return []
    choices = ("none", *names)
    plan = []
    for _ in range(steps):
        name = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        u = float(torch.rand((), generator=gen))  # drawn for every step, so a plan's order does not shift by name
        if name == "mp3":
            plan.append(Draw(name, float(MP3_KBPS[min(int(u * len(MP3_KBPS)), len(MP3_KBPS) - 1)])))
        elif name == "resample":
            plan.append(Draw(name, float(RESAMPLE_RATE)))
        elif name == "gain":
            plan.append(Draw(name, float(10 ** ((2 * u - 1) * GAIN_DB / 20))))
        else:
            plan.append(Draw(name))
    return plan


def with_ge2e_gains(plan: list[Draw], x16_clean: torch.Tensor) -> list[Draw]:
    """The plan with each level change's GE2E input gain computed once from the clean window at 16 kHz (on the host:
    not in the PGD step)."""
    gains: dict[float, float] = {}
    out = []
    for d in plan:
        if d.name == "gain":
            if d.value not in gains:
                gains[d.value] = volume_gain(x16_clean * d.value)
            d = replace(d, ge2e_gain=gains[d.value])
        out.append(d)
    return out


def codec_rate(sample_rate: int) -> int:
    """The rate an MP3 of a recording at `sample_rate` is encoded at (see the module's docstring)."""
    return sample_rate if sample_rate in MP3_RATES and sample_rate >= DIFFVC_RATE else MP3_DEFAULT_RATE


def mp3_straight_through(x: torch.Tensor, kbps: int, rate: int) -> torch.Tensor:
    """x (N,) at 22.05 kHz through an MP3 round trip at `rate`: the decoded audio forward, the identity backward."""
    wave = x.detach().float().cpu().numpy()
    up = to_rate(wave, DIFFVC_RATE, rate)
    decoded = to_rate(fit_length(mp3_roundtrip(up, rate, kbps), up.size), rate, DIFFVC_RATE)
    y = torch.from_numpy(np.ascontiguousarray(fit_length(decoded, wave.size))).to(x)
    return x + (y - x).detach()


def apply(draw: Draw, x: torch.Tensor, ge2e_gain: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One window's adversarial waveform x (N,) at 22.05 kHz as the attacker gets it after `draw`, and the GE2E
    input gain (1,) for it (`ge2e_gain`: the clean window's). The MP3 codec runs on the host."""
    n = x.shape[-1]
    if draw.name == "mp3":
        return mp3_straight_through(x, int(draw.value), codec_rate(sample_rate)), ge2e_gain
    if draw.name == "resample":
        y = resample(resample(x, DIFFVC_RATE, int(draw.value)), int(draw.value), DIFFVC_RATE)
        return torch.nn.functional.pad(y, (0, max(0, n - y.shape[-1])))[..., :n], ge2e_gain
    if draw.name == "gain":
        if draw.ge2e_gain is None:
            raise ValueError("a level-change draw needs its GE2E gain: make the plan with with_ge2e_gains")
        return (x * draw.value).clamp(-1.0, 1.0), torch.full_like(ge2e_gain, draw.ge2e_gain)
    if draw.name == "none":
        return x, ge2e_gain
    raise ValueError(f"unknown EOT transform {draw.name!r}; known: {', '.join(EOT_NAMES)}")
