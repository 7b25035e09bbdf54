"""ECAPA-TDNN speaker embeddings (speechbrain's `spkrec-ecapa-voxceleb`) in plain torch, no speechbrain/torchaudio.

The module layout reproduces speechbrain's `speechbrain/lobes/models/ECAPA_TDNN.py` so that the model directory's
`embedding_model.ckpt` (a plain state dict) loads with strict=True, and the front-end reproduces the model's
`compute_features` (speechbrain `Fbank`) and `mean_var_norm` (`InputNormalization`, sentence level, mean only).
Here: the model (ECAPA_TDNN, assembled from the blocks in cloak.models.ecapa_layers), the front-end, the encoder
and the loading of a model directory.

Model directory (the Hugging Face `speechbrain/spkrec-ecapa-voxceleb` layout)::

    hyperparams.yaml        optional here: sizes of the embedding model and the front-end (defaults: this model's)
    embedding_model.ckpt    required: the ECAPA_TDNN state dict
    mean_var_norm_emb.ckpt  ignored (see below); classifier.ckpt, label_encoder.txt: not needed for embeddings

Facts and where they were read (public code of speechbrain/speechbrain, read for facts; this code is written anew):

- `speechbrain/lobes/models/ECAPA_TDNN.py`: module names and wiring. `TDNNBlock` = `conv` (Conv1d) -> activation
  (ReLU) -> `norm` (BatchNorm1d) -> dropout (ReLU *before* BatchNorm). `Res2NetBlock`: input split in `scale`
  chunks (torch.chunk on channels); chunk 0 passes through, chunk 1 -> `blocks[0]`, chunk i>1 -> `blocks[i-1]`
  applied to chunk_i + previous output; `scale - 1` TDNNBlocks of width channels/scale. `SEBlock`: (masked) mean
  over time -> `conv1` -> ReLU -> `conv2` -> sigmoid, times the input. `SERes2NetBlock`: `tdnn1` (k=1) ->
  `res2net_block` -> `tdnn2` (k=1) -> `se_block`, plus the residual (`shortcut` conv only when in != out
  channels). `ECAPA_TDNN`: `blocks[0]` TDNNBlock, `blocks[1..n-2]` SERes2NetBlocks, `mfa` TDNNBlock on the
  concatenation of the SERes2Net outputs (`xl[1:]`), `asp` AttentiveStatisticsPooling (global context: attention
  input = [x, mean, std] repeated over time; `tdnn` -> tanh -> `conv` -> softmax over time; weighted mean and
  std = sqrt(clamp(sum w (x - mean)^2, 1e-12))), `asp_bn` BatchNorm1d on [mean, std], `fc` Conv1d k=1 to
  `lin_neurons`; output (B, 1, lin_neurons). Defaults: res2net_scale 8, se_channels 128, attention_channels 128,
  global_context True, groups 1.
- `speechbrain/nnet/CNN.py` Conv1d: wrapped `nn.Conv1d` as attribute `conv` (hence `...conv.conv.weight`),
  padding "same" with padding_mode "reflect" by default; `get_padding_elem` for stride 1 pads
  dilation*(kernel-1)//2 on each side.
- `speechbrain/nnet/normalization.py` BatchNorm1d: wrapped `nn.BatchNorm1d(eps=1e-5, momentum=0.1)` as attribute
  `norm` (hence `...norm.norm.running_mean` inside a TDNNBlock). (Read in an older version of the file and in
  ports of it.) `asp_bn` and `fc` are these wrappers *directly* (not TDNNBlocks), so their keys have one level
  less: `asp_bn.norm.weight`, `fc.conv.weight` (not `asp_bn.norm.norm.*` / `fc.conv.conv.*`). Confirmed by
  several independent public converters of the real `embedding_model.ckpt` (e.g. GGML/MLX ports that read
  `asp_bn.norm.running_mean`, `fc.conv.weight`, `asp.tdnn.conv.conv.weight` of shape [128, 9216, 1]); these were
  found with code search, their repositories were not identified.
- `speechbrain/lobes/features.py` Fbank: STFT(sample_rate, n_fft=400, win_length=25 ms, hop_length=10 ms) ->
  `spectral_magnitude` (power=1: re^2 + im^2, i.e. the power spectrogram) -> Filterbank(f_min 0, f_max
  sample_rate/2); deltas and context off by default.
- `speechbrain/processing/features.py`: STFT window `torch.hamming_window(win_length)` (periodic), center=True,
  pad_mode "constant" (zeros), onesided. Filterbank: mel = 2595 log10(1 + hz/700); n_mels + 2 points equally
  spaced in mel between f_min and f_max; filter i centred at hz[i+1] with half-width band_i = hz[i+1] - hz[i]
  (speechbrain's triangles are symmetric in Hz with the *left* spacing as half-width), weight
  max(0, min(1 + s, 1 - s)), s = (f - centre) / band, on bins linspace(0, sample_rate // 2, n_fft // 2 + 1);
  log: 10 log10(clamp(x, amin=1e-10)) - 10 log10(max(amin, ref=1.0)), then floored at (max over the whole
  utterance, time and mel) - top_db 80. InputNormalization(norm_type "sentence", std_norm False): subtracts the
  mean over the frames of each utterance; the statistics are computed under `.detach()` (no gradient flows
  through the mean), which `embed` reproduces. With std_norm the std is torch.std (unbiased) clamped at 1e-10.
- `speechbrain/inference/classifiers.py` EncoderClassifier.encode_batch: compute_features -> mean_var_norm ->
  embedding_model(feats, lengths); `mean_var_norm_emb` is applied only when normalize=True, default False; and
  `speechbrain/inference/speaker.py` SpeakerRecognition.verify_batch scores with encode_batch(normalize=False),
  cosine similarity, threshold 0.25. So the verification pipeline never applies `mean_var_norm_emb.ckpt`, and
  neither does this module (cosine is scale invariant, so `embed` L2-normalises for the SpeakerEncoder protocol).
- spkrec-ecapa-voxceleb hyperparameters (input_size = n_mels 80, channels [1024, 1024, 1024, 1024, 3072],
  kernel_sizes [5, 3, 3, 3, 1], dilations [1, 2, 3, 4, 1], attention_channels 128, lin_neurons 192): from a public
  script that instantiates ECAPA_TDNN for that checkpoint (MathisLB/speechbrain_inference pretrainer_class.py) and
  from a public export script that asserts, on the loaded model, n_fft 400, hop 160, win 400, STFT pad_mode
  "constant" and mean_var_norm sentence/std_norm False. The model card's hyperparams.yaml itself was not found
  in the searchable public code; res2net_scale 8, se_channels 128 and global_context True are the ECAPA_TDNN
  defaults, assumed not overridden there. When the directory has a hyperparams.yaml, its values are used.

Not verifiable here: numerical parity with speechbrain on the real weights (no speechbrain, no weights, no hub in
this environment). The tests check the key layout, strict loading and the front-end against an independent
numpy computation of the definition above.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ecapa_layers import (
    AttentiveStatisticsPooling,
    SERes2NetBlock,
    SpeechbrainBatchNorm1d,
    SpeechbrainConv1d,
    TDNNBlock,
)

ECAPA_THRESHOLD = 0.25  # speechbrain SpeakerRecognition.verify_batch's default; the paper's ASV threshold
CHECKPOINT = "embedding_model.ckpt"
HYPERPARAMS = "hyperparams.yaml"


class EcapaLoadError(ValueError):
    """The model directory's checkpoint does not match the ECAPA-TDNN it describes."""


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class EcapaConfig:
    """ECAPA_TDNN constructor arguments; defaults = speechbrain/spkrec-ecapa-voxceleb."""

    input_size: int = 80
    channels: tuple[int, ...] = (1024, 1024, 1024, 1024, 3072)
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    attention_channels: int = 128
    lin_neurons: int = 192
    res2net_scale: int = 8
    se_channels: int = 128
    global_context: bool = True
    groups: tuple[int, ...] = field(default=(1, 1, 1, 1, 1))

    def __post_init__(self) -> None:
        for name in ("channels", "kernel_sizes", "dilations", "groups"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.channels)
        if n < 3 or len(self.kernel_sizes) != n or len(self.dilations) != n:
            raise ValueError(f"channels, kernel_sizes and dilations need the same length >= 3: {self}")
        if len(self.groups) != n:
            if set(self.groups) != {1}:
                raise ValueError(f"groups needs one entry per layer: {self}")
            object.__setattr__(self, "groups", (1,) * n)


class ECAPA_TDNN(nn.Module):  # noqa: N801 - speechbrain's name
    """speechbrain's ECAPA_TDNN: (B, T, input_size) features -> (B, 1, lin_neurons)."""

    def __init__(self, config: EcapaConfig | None = None) -> None:
        super().__init__()
        c = config or EcapaConfig()
        self.config = c
        ch = c.channels
        self.blocks = nn.ModuleList([TDNNBlock(c.input_size, ch[0], c.kernel_sizes[0], c.dilations[0], c.groups[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], c.res2net_scale, c.se_channels, c.kernel_sizes[i],
                                              c.dilations[i], c.groups[i]))
        self.mfa = TDNNBlock(ch[-2] * (len(ch) - 2), ch[-1], c.kernel_sizes[-1], c.dilations[-1], c.groups[-1])
        self.asp = AttentiveStatisticsPooling(ch[-1], c.attention_channels, c.global_context)
        self.asp_bn = SpeechbrainBatchNorm1d(ch[-1] * 2)
        self.fc = SpeechbrainConv1d(ch[-1] * 2, c.lin_neurons, 1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = feats.transpose(1, 2)
        xl: list[torch.Tensor] = []
        for i, layer in enumerate(self.blocks):
            x = layer(x) if i == 0 else layer(x, lengths)
            xl.append(x)
        x = self.mfa(torch.cat(xl[1:], dim=1))
        x = self.asp_bn(self.asp(x, lengths))
        return self.fc(x).transpose(1, 2)


# --------------------------------------------------------------------------------------------- front-end


@dataclass(frozen=True)
class FbankConfig:
    """speechbrain Fbank (+ InputNormalization) settings; defaults = spkrec-ecapa-voxceleb."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length_ms: float = 25.0
    hop_length_ms: float = 10.0
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    amin: float = 1e-10
    top_db: float = 80.0
    mean_norm: bool = True
    std_norm: bool = False

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate / 1000.0 * self.win_length_ms))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate / 1000.0 * self.hop_length_ms))


def mel_filterbank(cfg: FbankConfig) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) matrix of speechbrain's triangular filters (see the module docstring)."""
    f_max = cfg.sample_rate / 2 if cfg.f_max is None else cfg.f_max
    to_mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    mel = torch.linspace(to_mel(cfg.f_min), to_mel(f_max), cfg.n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    band = (hz[1:] - hz[:-1])[:-1]
    centre = hz[1:-1]
    freqs = torch.linspace(0, cfg.sample_rate // 2, cfg.n_fft // 2 + 1)
    slope = (freqs[None, :] - centre[:, None]) / band[:, None]
    return torch.clamp(torch.minimum(slope + 1.0, 1.0 - slope), min=0.0).T.contiguous()


class Fbank(nn.Module):
    """Waveform (B, N) -> log-mel (B, 1 + N // hop, n_mels), then sentence-level mean normalisation."""

    def __init__(self, cfg: FbankConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FbankConfig()
        self.register_buffer("window", torch.hamming_window(self.cfg.win_length), persistent=False)
        self.register_buffer("fbank", mel_filterbank(self.cfg), persistent=False)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        spec = torch.stft(wave.float(), c.n_fft, c.hop_length, c.win_length, self.window, center=True,
                          pad_mode="constant", normalized=False, onesided=True, return_complex=True)
        power = (spec.real.square() + spec.imag.square()).transpose(1, 2)  # (B, T, F)
        db = 10.0 * torch.log10(torch.clamp(power @ self.fbank, min=c.amin))
        db = db - 10.0 * math.log10(max(c.amin, 1.0))
        floor = db.amax(dim=(-2, -1), keepdim=True) - c.top_db
        return torch.maximum(db, floor)

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.mean_norm:
            feats = feats - feats.mean(dim=1, keepdim=True).detach()
        if c.std_norm:
            feats = feats / feats.std(dim=1, keepdim=True).detach().clamp(min=1e-10)
        return feats

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.log_mel(wave))


# ------------------------------------------------------------------------------------------------ encoder


class EcapaEncoder(nn.Module):
    """The whole speechbrain verification embedding: Fbank -> mean norm -> ECAPA_TDNN. Frozen, eval mode."""

    name = "ecapa"
    sample_rate = 16000

    def __init__(self, model: ECAPA_TDNN, fbank: Fbank | None = None, checksum: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.fbank = fbank or Fbank(FbankConfig(n_mels=model.config.input_size))
        if self.fbank.cfg.n_mels != model.config.input_size:
            raise ValueError(f"front-end n_mels {self.fbank.cfg.n_mels} != model input_size "
                             f"{model.config.input_size}")
        self.sample_rate = self.fbank.cfg.sample_rate
        self.checksum = checksum
        self.requires_grad_(False)
        self.eval()

    @property
    def min_samples(self) -> int:
        """Shortest input whose frame count admits every reflect padding (pad < frames)."""
        c = self.model.config
        pad = max(d * (k - 1) // 2 for k, d in zip(c.kernel_sizes, c.dilations, strict=True))
        return pad * self.fbank.cfg.hop_length

    def forward(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, N) or (N,) waveform -> (B, lin_neurons) raw embeddings (speechbrain encode_batch, normalize=False)."""
        x = wave_16k if wave_16k.dim() == 2 else wave_16k.unsqueeze(0)
        if x.shape[-1] < self.min_samples:
            raise ValueError(f"ECAPA needs at least {self.min_samples} samples, got {x.shape[-1]}")
        return self.model(self.fbank(x)).squeeze(1)

    def embed(self, wave_16k: torch.Tensor) -> torch.Tensor:
        """(B, N) or (N,) 16 kHz waveform -> (B, lin_neurons) L2-normalised embeddings, differentiable in the
        input. Cosine scores equal speechbrain's verify_batch scores (cosine of the raw embeddings)."""
        return F.normalize(self.forward(wave_16k), dim=-1)


# ------------------------------------------------------------------------------------------------ loading

_REF = re.compile(r"^!ref\s+<([^>]+)>$")


def _scalar(text: str) -> Any:
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [_scalar(v) for v in inner.split(",")] if inner else []
    if t in ("True", "true"):
        return True
    if t in ("False", "false"):
        return False
    if t in ("null", "None", "~"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


def read_hyperparams(path: str | Path) -> dict[str, Any]:
    """The few values of a speechbrain HyperPyYAML file this module needs, without a YAML library (the file's
    `!new:` / `!ref` tags are not plain YAML): {'top': {key: value}, block_name: {key: value}} where blocks are
    top-level keys with indented `key: value` lines below them; `!ref <name>` resolves to a top-level value."""
    out: dict[str, dict[str, Any]] = {"top": {}}
    raw_top: dict[str, str] = {}
    block: str | None = None
    lines: list[tuple[str | None, str, str]] = []
    for line in Path(path).read_text().splitlines():
        code = line.split(" #", 1)[0].rstrip()
        if not code.strip() or code.lstrip().startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z_][\w.]*)\s*:\s*(.*)$", code)
        if m is None:
            continue
        indent, key, value = m.groups()
        if not indent:
            block = key
            if value and not value.startswith("!"):
                raw_top[key] = value
            lines.append((None, key, value))
        elif block is not None:
            lines.append((block, key, value))

    def resolve(value: str, depth: int = 0) -> Any:
        r = _REF.match(value.strip())
        if r is None:
            return _scalar(value)
        name = r.group(1)
        if name not in raw_top or depth > 8:
            return value.strip()  # a reference to an object (e.g. `!ref <embedding_model>`): not a number we need
        return resolve(raw_top[name], depth + 1)

    for blk, key, value in lines:
        if blk is None:
            if key in raw_top:
                out["top"][key] = resolve(raw_top[key])
            else:
                out.setdefault(key, {})
        elif not value.startswith("!new:") and not value.startswith("!name:"):
            out.setdefault(blk, {})[key] = resolve(value) if value else None
    return out


def configs_from_hyperparams(path: str | Path) -> tuple[EcapaConfig, FbankConfig]:
    hp = read_hyperparams(path)
    em = hp.get("embedding_model", {})
    names = {f.name for f in fields(EcapaConfig)}
    try:
        config = EcapaConfig(**{k: v for k, v in em.items() if k in names})
    except (TypeError, ValueError) as e:
        raise EcapaLoadError(f"{path}: unusable embedding_model settings {em}: {e}") from e
    feat = hp.get("compute_features", {})
    norm = hp.get("mean_var_norm", {})
    if norm.get("norm_type", "sentence") != "sentence":
        raise EcapaLoadError(f"{path}: mean_var_norm norm_type {norm.get('norm_type')!r} is not supported "
                             "(only 'sentence')")
    for unsupported in ("deltas", "context"):
        if feat.get(unsupported):
            raise EcapaLoadError(f"{path}: compute_features {unsupported}=True is not supported")
    fb = FbankConfig(
        sample_rate=int(feat.get("sample_rate", hp["top"].get("sample_rate", 16000))),
        n_fft=int(feat.get("n_fft", 400)),
        win_length_ms=float(feat.get("win_length", 25)), hop_length_ms=float(feat.get("hop_length", 10)),
        n_mels=int(feat.get("n_mels", config.input_size)), f_min=float(feat.get("f_min", 0)),
        f_max=None if feat.get("f_max") is None else float(feat["f_max"]),
        mean_norm=bool(norm.get("mean_norm", True)), std_norm=bool(norm.get("std_norm", True)) if norm else False)
    return config, fb


def load_ecapa(model_dir: str | Path, device: str | torch.device = "cpu") -> EcapaEncoder:
    """Load a speechbrain `spkrec-ecapa-voxceleb`-layout directory: hyperparams.yaml (optional, sizes) and
    embedding_model.ckpt (required, loaded with strict=True). Raises FileNotFoundError for a missing directory or
    checkpoint, EcapaLoadError naming the missing / unexpected / mis-shaped keys."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"ECAPA model directory not found: {d}")
    ckpt = d / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"ECAPA model directory {d} has no {CHECKPOINT} (the ECAPA_TDNN state dict of "
                                "speechbrain/spkrec-ecapa-voxceleb)")
    hp = d / HYPERPARAMS
    config, fb = configs_from_hyperparams(hp) if hp.is_file() else (EcapaConfig(), FbankConfig())
    model = ECAPA_TDNN(config)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise EcapaLoadError(f"{ckpt}: not a readable torch state dict ({e})") from e
    if not isinstance(state, dict):
        raise EcapaLoadError(f"{ckpt}: expected a state dict, got {type(state).__name__}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}"
                         + (f" (+{len(shapes) - 10} more)" if len(shapes) > 10 else ""))
        raise EcapaLoadError(f"{ckpt} does not match ECAPA_TDNN({config}): " + "; ".join(parts)
                             + (f" (sizes from {hp})" if hp.is_file() else " (default sizes: no hyperparams.yaml)"))
    model.load_state_dict(state, strict=True)
    h = hashlib.sha256()
    with open(ckpt, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return EcapaEncoder(model, Fbank(fb), h.hexdigest()).to(device)


__all__ = ["ECAPA_THRESHOLD", "ECAPA_TDNN", "EcapaConfig", "EcapaEncoder", "EcapaLoadError", "Fbank", "FbankConfig",
           "load_ecapa", "mel_filterbank", "read_hyperparams"]
