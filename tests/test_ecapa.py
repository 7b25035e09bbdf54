"""Native ECAPA-TDNN (speechbrain spkrec-ecapa-voxceleb layout): key layout against speechbrain's module names,
strict loading of a small model saved in speechbrain's layout, the Fbank front-end against numpy, and the
`cloak evaluate` wiring (an ecapa/ bundle directory makes it the primary, black-box ASV at 0.25)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import corpus_clip, make_bundle, to_rate

from cloak.models.ecapa import (
    ECAPA_TDNN,
    EcapaConfig,
    EcapaLoadError,
    Fbank,
    FbankConfig,
    load_ecapa,
    read_hyperparams,
)

SMALL = EcapaConfig(input_size=40, channels=(64, 64, 64, 64, 192), attention_channels=16, lin_neurons=32,
                    se_channels=16)

# Written in the style of the model card's hyperparams.yaml (HyperPyYAML tags, !ref), at small sizes.
SMALL_YAML = """\
# ############################################################################
# Model: ECAPA big for Speaker verification (small test copy)
# ############################################################################

pretrained_path: speechbrain/spkrec-ecapa-voxceleb

# Feature parameters
n_mels: 40

# Pretrain folder (HuggingFace)
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [64, 64, 64, 64, 192]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 16
    lin_neurons: 32
    se_channels: 16  # speechbrain's default is 128

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def _bn(prefix: str, n: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.norm.weight", (n,)), (f"{prefix}.norm.bias", (n,)), (f"{prefix}.norm.running_mean", (n,)),
            (f"{prefix}.norm.running_var", (n,)), (f"{prefix}.norm.num_batches_tracked", ())]


def _tdnn(prefix: str, cin: int, cout: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
    """speechbrain TDNNBlock: conv (speechbrain Conv1d wrapping nn.Conv1d as .conv), norm (BatchNorm1d wrapping
    nn.BatchNorm1d as .norm)."""
    return [(f"{prefix}.conv.conv.weight", (cout, cin, k)), (f"{prefix}.conv.conv.bias", (cout,))] + _bn(
        f"{prefix}.norm", cout)


# The full-size spkrec-ecapa-voxceleb keys, derived by hand from speechbrain/lobes/models/ECAPA_TDNN.py (channels
# [1024]*4 + [3072], kernels [5, 3, 3, 3, 1], dilations [1, 2, 3, 4, 1], scale 8, se 128, attention 128, lin 192,
# global context): the first TDNN block, one SE-Res2Net block, and everything after the blocks. asp_bn and fc are
# bare speechbrain BatchNorm1d / Conv1d wrappers (one .norm / .conv level), not TDNNBlocks.
SPEECHBRAIN_KEYS: list[tuple[str, tuple[int, ...]]] = sorted(
    _tdnn("blocks.0", 80, 1024, 5)
    + _tdnn("blocks.1.tdnn1", 1024, 1024, 1)
    + [kv for i in range(7) for kv in _tdnn(f"blocks.1.res2net_block.blocks.{i}", 128, 128, 3)]
    + _tdnn("blocks.1.tdnn2", 1024, 1024, 1)
    + [("blocks.1.se_block.conv1.conv.weight", (128, 1024, 1)), ("blocks.1.se_block.conv1.conv.bias", (128,)),
       ("blocks.1.se_block.conv2.conv.weight", (1024, 128, 1)), ("blocks.1.se_block.conv2.conv.bias", (1024,))]
    + _tdnn("mfa", 3072, 3072, 1)
    + _tdnn("asp.tdnn", 9216, 128, 1)
    + [("asp.conv.conv.weight", (3072, 128, 1)), ("asp.conv.conv.bias", (3072,))]
    + _bn("asp_bn", 6144)
    + [("fc.conv.weight", (192, 6144, 1)), ("fc.conv.bias", (192,))])


def small_model(seed: int = 0) -> ECAPA_TDNN:
    """SMALL with seeded random weights and random BatchNorm running statistics (eval mode uses them)."""
    torch.manual_seed(seed)
    m = ECAPA_TDNN(SMALL)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn_like(t) * 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) * 1.5 + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif name.endswith("norm.weight"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("norm.bias"):
                t.copy_(torch.randn_like(t) * 0.1)
    return m.eval()


def write_model_dir(d, model: ECAPA_TDNN | None = None, yaml: str | None = SMALL_YAML):
    """speechbrain's layout: embedding_model.ckpt is a plain state dict (torch.save(module.state_dict()))."""
    d.mkdir(parents=True)
    torch.save((model or small_model()).state_dict(), d / "embedding_model.ckpt")
    if yaml is not None:
        (d / "hyperparams.yaml").write_text(yaml)
    return d


@pytest.fixture(scope="module")
def speech16k(corpus):
    x, sr = corpus_clip("vctk_p226", 0, seconds=3.0)
    return x if sr == 16000 else to_rate(x, sr, 16000)


def test_full_size_key_layout_matches_speechbrain():
    sd = ECAPA_TDNN().state_dict()  # the default config is spkrec-ecapa-voxceleb's
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    got = sorted((k, s) for k, s in shapes.items() if not k.startswith(("blocks.2.", "blocks.3.")))
    assert got == SPEECHBRAIN_KEYS
    # blocks 2 and 3 are the same SE-Res2Net block as block 1; there is no shortcut (in == out channels)
    block1 = sorted((k[len("blocks.1."):], s) for k, s in shapes.items() if k.startswith("blocks.1."))
    for b in (2, 3):
        assert sorted((k[len(f"blocks.{b}."):], s) for k, s in shapes.items() if k.startswith(f"blocks.{b}.")) == block1
    assert len(sd) == 231 and not any("shortcut" in k for k in sd)
    # ~20.8 M numbers, consistent with the ~83 MB embedding_model.ckpt of the model card
    assert 20.7e6 < sum(v.numel() for v in sd.values()) < 20.9e6


def test_hyperparams_parse_reads_the_model_card_style():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "hyperparams.yaml"
        p.write_text(SMALL_YAML)
        hp = read_hyperparams(p)
    em = hp["embedding_model"]
    assert em["input_size"] == 40 and em["channels"] == [64, 64, 64, 64, 192] and em["se_channels"] == 16
    assert hp["mean_var_norm"] == {"norm_type": "sentence", "std_norm": False}
    assert hp["compute_features"] == {"n_mels": 40} and hp["top"]["n_mels"] == 40


def test_small_model_loads_strict_and_embeds_corpus_speech(tmp_path, speech16k):
    ref = small_model()
    enc = load_ecapa(write_model_dir(tmp_path / "ecapa", ref))
    assert enc.model.config == SMALL and enc.fbank.cfg.n_mels == 40 and not enc.fbank.cfg.std_norm
    for (k, a), (k2, b) in zip(ref.state_dict().items(), enc.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert len(enc.checksum or "") == 64

    x = torch.from_numpy(speech16k)
    e1 = enc.embed(x)
    assert e1.shape == (1, 32) and torch.isfinite(e1).all()
    assert torch.allclose(e1.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.equal(e1, enc.embed(x))  # deterministic (eval mode: running statistics, no dropout)
    raw = enc(x)  # speechbrain encode_batch(normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), e1)
    # batch rows are independent (sentence-level normalisation and statistics per row)
    other = torch.from_numpy(speech16k[::-1].copy())
    both = enc.embed(torch.stack([x, other]))
    assert both.shape == (2, 32)
    assert torch.allclose(both[0], e1[0], atol=1e-5) and torch.allclose(both[1], enc.embed(other)[0], atol=1e-5)
    # differentiable in the input, weights frozen
    xi = x[:16000].clone().requires_grad_(True)
    enc.embed(xi)[0, 0].backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    with pytest.raises(ValueError, match="at least"):
        enc.embed(torch.zeros(100))


def test_default_sizes_without_hyperparams_and_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_ecapa(tmp_path / "nope")
    empty = tmp_path / "noweights"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="embedding_model.ckpt"):
        load_ecapa(empty)

    # one key renamed: strict loading fails naming both the missing and the unexpected key
    sd = small_model().state_dict()
    sd["blocks.1.se_block.conv1.conv.weight_renamed"] = sd.pop("blocks.1.se_block.conv1.conv.weight")
    d = tmp_path / "renamed"
    d.mkdir()
    torch.save(sd, d / "embedding_model.ckpt")
    (d / "hyperparams.yaml").write_text(SMALL_YAML)
    with pytest.raises(EcapaLoadError) as err:
        load_ecapa(d)
    msg = str(err.value)
    assert "missing keys ['blocks.1.se_block.conv1.conv.weight']" in msg
    assert "unexpected keys ['blocks.1.se_block.conv1.conv.weight_renamed']" in msg

    # a small checkpoint without hyperparams.yaml is read as the full-size model: shape mismatches are named
    d2 = write_model_dir(tmp_path / "noyaml", yaml=None)
    pattern = r"shape mismatches.*asp\.conv\.conv\.weight: checkpoint \(192, 16, 1\).*more.*no hyperparams"
    with pytest.raises(EcapaLoadError, match=pattern):
        load_ecapa(d2)


def numpy_fbank(x: np.ndarray, sr: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 40) -> np.ndarray:
    """Independent float64 computation of speechbrain's Fbank definition: zero-padded centred frames, periodic
    Hamming window, |rfft|^2, symmetric triangular mel filters (half-width = left spacing), 10 log10 with
    amin 1e-10, floored at the utterance max - 80 dB."""
    x = np.asarray(x, np.float64)
    xp = np.pad(x, (n_fft // 2, n_fft // 2))
    frames = 1 + len(x) // hop
    win = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    seg = np.stack([xp[i * hop: i * hop + n_fft] * win for i in range(frames)])
    power = np.abs(np.fft.rfft(seg, axis=1)) ** 2
    mel = np.linspace(2595 * np.log10(1.0), 2595 * np.log10(1 + (sr / 2) / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    freqs = np.linspace(0, sr // 2, n_fft // 2 + 1)
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        c, w = hz[m + 1], hz[m + 1] - hz[m]
        fb[:, m] = np.maximum(0.0, 1.0 - np.abs(freqs - c) / w)
    db = 10 * np.log10(np.maximum(power @ fb, 1e-10))
    return np.maximum(db, db.max() - 80.0)


def test_fbank_matches_numpy_on_corpus_speech(speech16k):
    x = speech16k[: 16000 * 2 + 77]
    fb = Fbank(FbankConfig(n_mels=40))
    got = fb.log_mel(torch.from_numpy(x)[None])[0].numpy()
    ref = numpy_fbank(x, n_mels=40)
    assert got.shape == ref.shape == (1 + len(x) // 160, 40)
    assert np.max(np.abs(got - ref)) < 1e-2  # dB; float32 vs float64
    norm = fb(torch.from_numpy(x)[None])[0].numpy()
    assert np.allclose(norm, ref - ref.mean(axis=0, keepdims=True), atol=1e-2)
    assert np.abs(norm.mean(axis=0)).max() < 1e-3
    # the 80-dB floor is active on silence-padded speech and matches too
    xs = np.concatenate([np.zeros(8000, np.float32), x[:16000]])
    g2 = fb.log_mel(torch.from_numpy(xs)[None])[0].numpy()
    r2 = numpy_fbank(xs, n_mels=40)
    assert math.isclose(float(g2.min()), float(r2.max()) - 80.0, abs_tol=1e-2)
    assert np.max(np.abs(g2 - r2)) < 1e-2


def test_evaluate_uses_ecapa_from_the_bundle_as_primary_black_box_asv(tmp_path, speech16k):
    from cloak import ProtectConfig, load_models
    from cloak.evaluate.encoders import ECAPA_THRESHOLD, build_encoders
    from cloak.evaluate.protocol import primary_encoder
    from cloak.evaluate.report import asv_thresholds

    bundle = make_bundle(tmp_path / "bundle", tame=True)
    models = load_models(bundle)
    encoders, info = build_encoders(models, ProtectConfig())
    # GE2E (white-box) and the shipped black-box verifier, which decides while there is no ECAPA
    assert [e.name for e in encoders] == ["ge2e", "verifier"] and primary_encoder(encoders) == "verifier"
    assert not info["ecapa"]["available"] and "ecapa/" in info["ecapa"]["reason"]

    write_model_dir(bundle / "ecapa")
    models = load_models(bundle)
    assert models.ecapa is not None and "ecapa" in [i.name for i in models.info]
    encoders, info = build_encoders(models, ProtectConfig())
    by_name = {e.name: e for e in encoders}
    assert primary_encoder(encoders) == "ecapa"
    ecapa = by_name["ecapa"]
    assert not ecapa.white_box and ecapa.fixed_threshold == ECAPA_THRESHOLD == 0.25
    assert info["ecapa"]["available"] and not info["ecapa"]["white_box"]
    assert info["ecapa"]["fixed_threshold"] == 0.25 and info["ecapa"]["checksum"] == models.ecapa.checksum
    v = ecapa.embed(speech16k)
    assert v.shape == (32,) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    # the report uses the fixed 0.25 for ECAPA, the EER calibration for the others
    thr = asv_thresholds({"ecapa": {"threshold": 0.6}, "ge2e": {"threshold": 0.7}}, info)
    assert thr == {"ecapa": 0.25, "ge2e": 0.7}


def test_broken_ecapa_dir_is_a_bundle_error(tmp_path):
    from cloak import BundleError, load_models

    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "ecapa").mkdir()
    with pytest.raises(BundleError, match="ecapa/.*embedding_model.ckpt"):
        load_models(bundle)
