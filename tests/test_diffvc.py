"""DiffVC: checkpoint layout, official numerics of the pieces the attack differentiates, sampler semantics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REFERENCE, TINY, need_data, tiny_diffvc
from torch.nn import functional as F

from cloak.models import DiffVC, load_diffvc
from cloak.models.diffvc_decoder import ATTN_KEYS
from cloak.models.diffvc_encoder import MultiHeadAttention

TSV = REFERENCE / "diffvc_state_dict.tsv"


def reference_layout() -> dict[str, tuple[int, ...]]:
    need_data(TSV, "the official DiffVC state-dict layout")
    rows = [r.split("\t") for r in TSV.read_text().splitlines() if r and not r.startswith("#")]
    return {k: tuple(int(x) for x in s.split(",")) if s else () for k, s in rows}


def test_official_layout_matches_release_exactly():
    with torch.device("meta"):
        m = DiffVC()
    mine = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = reference_layout()
    assert mine == ref
    assert len(mine) == 346
    assert sum(p.numel() for p in m.parameters()) == 126_259_128
    assert sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder.")) == 8_464_529
    assert not list(m.buffers()), "the official checkpoints hold no buffers"


def test_raw_state_dict_loads_strict(tmp_path):
    m = tiny_diffvc()
    torch.save(m.state_dict(), tmp_path / "vc.pt")  # official format: a plain state dict
    from cloak.models.diffvc import DiffVCConfig

    loaded = load_diffvc(str(tmp_path / "vc.pt"), DiffVCConfig(**TINY))
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    bad = {k: v for k, v in m.state_dict().items() if not k.endswith("final_conv.bias")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match"):
        load_diffvc(str(tmp_path / "bad.pt"), DiffVCConfig(**TINY))


def _official_relative_attention(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official procedure (pad/reshape between relative and absolute positions), as an independent check."""
    b, d, t = x.shape
    h, k, w = mha.n_heads, mha.k_channels, mha.window_size
    q = mha.conv_q(x).view(b, h, k, t).transpose(2, 3)
    key = mha.conv_k(x).view(b, h, k, t).transpose(2, 3)
    v = mha.conv_v(x).view(b, h, k, t).transpose(2, 3)

    def used(emb):
        pad = max(t - (w + 1), 0)
        start = max((w + 1) - t, 0)
        e = F.pad(emb, (0, 0, pad, pad)) if pad > 0 else emb
        return e[:, start:start + 2 * t - 1]

    scores = q @ key.transpose(-2, -1) / math.sqrt(k)
    rel = q @ used(mha.emb_rel_k).unsqueeze(0).transpose(-2, -1)
    rel = F.pad(rel, (0, 1)).view(b, h, 2 * t * t)
    rel = F.pad(rel, (0, t - 1)).view(b, h, t + 1, 2 * t - 1)[:, :, :t, t - 1:]
    scores = scores + rel / math.sqrt(k)
    scores = scores.masked_fill((mask.unsqueeze(2) * mask.unsqueeze(-1)) == 0, -1e4)
    p = scores.softmax(-1)
    out = p @ v
    pr = F.pad(p, (0, t - 1)).view(b, h, t * (2 * t - 1))
    pr = F.pad(pr, (t, 0)).view(b, h, t, 2 * t)[:, :, :, 1:]
    out = out + pr @ used(mha.emb_rel_v).unsqueeze(0)
    return mha.conv_o(out.transpose(2, 3).reshape(b, d, t))


@pytest.mark.parametrize("t", [3, 5, 37])
def test_relative_attention_equals_official_procedure(t):
    torch.manual_seed(t)
    mha = MultiHeadAttention(16, 16, 2, window_size=4).eval()
    x = torch.randn(2, 16, t)
    mask = torch.ones(2, 1, t)
    mask[1, :, t - 1:] = 0
    attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
    torch.testing.assert_close(mha(x, attn_mask), _official_relative_attention(mha, x, mask), atol=1e-5, rtol=1e-5)


def test_schedule_numbers():
    dec = tiny_diffvc().decoder
    assert dec.get_gamma(0, 1.0) == pytest.approx(math.exp(-0.5 * 10.025))
    assert dec.get_gamma(0, 1.0) == pytest.approx(0.0067, abs=1e-4)
    t = torch.tensor([0.3, 1.0])
    assert torch.allclose(dec.variance(t).flatten(), 1 - torch.exp(-(0.05 * t + 0.5 * 19.95 * t**2)))


def _inputs(b=2, t=24, tr=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 80, t, generator=g)
    mean = torch.randn(b, 80, t, generator=g)
    ref = torch.randn(b, 1, 80, tr, generator=g)
    c = F.normalize(torch.rand(b, 256, generator=g), dim=-1)
    return x, torch.ones(b, 1, t), mean, ref, torch.ones(b, 1, tr), c, torch.tensor([0.95, 0.5][:b])


def test_score_internals_match_independent_computation():
    m = tiny_diffvc()
    x, xm, mean, ref, rm, c, t = _inputs()
    s, internals = m.score(x, xm, mean, ref, rm, c, t, return_internals=True)
    assert torch.equal(s, m.score(x, xm, mean, ref, rm, c, t))
    assert set(internals.contexts) == set(ATTN_KEYS)
    for v in internals.contexts.values():
        assert v.shape == (2, 4, 32, 32)
    assert internals.features["ups.0"].shape == (2, TINY["dec_dim"] * 2, 40, 12)
    assert internals.features["ups.1"].shape == (2, TINY["dec_dim"], 80, 24)
    # recompute one context from the attention block's input (forward hook) and its to_qkv weights
    seen = {}
    block = m.decoder.estimator.downs[1][2]
    handle = block.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    m.score(x, xm, mean, ref, rm, c, t)
    handle.remove()
    qkv = block.fn.fn.to_qkv(seen["x"])
    b, _, hh, ww = seen["x"].shape
    _, k, v = qkv.reshape(b, 3, 4, 32, hh * ww).unbind(1)
    ctx = torch.einsum("bhdn,bhen->bhde", k.softmax(-1), v)
    torch.testing.assert_close(ctx, internals.contexts["downs.1.2"])


def test_score_pads_time_to_multiple_of_four():
    m = tiny_diffvc()
    x, xm, mean, ref, rm, c, t = _inputs(t=22)
    s = m.score(x, xm, mean, ref, rm, c, t)
    assert s.shape == (2, 80, 22)
    xp = F.pad(x, (0, 2))
    sp = m.score(xp, F.pad(xm, (0, 2)), F.pad(mean, (0, 2)), ref, rm, c, t)
    torch.testing.assert_close(s, sp[..., :22])


def test_score_is_differentiable_wrt_reference_and_embedding():
    m = tiny_diffvc()
    x, xm, mean, ref, rm, c, t = _inputs()
    ref.requires_grad_(True)
    c.requires_grad_(True)
    m.score(x, xm, mean, ref, rm, c, t).pow(2).sum().backward()
    assert ref.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


def test_diffused_reference_formula():
    m = tiny_diffvc()
    ref = torch.randn(2, 80, 10)
    mean_ref = torch.randn(2, 80, 10)
    mask = torch.ones(2, 1, 10)
    mask[1, :, 7:] = 0
    t = torch.tensor([0.9, 0.2])
    g = m.decoder.get_gamma(0, t)
    torch.testing.assert_close(m.diffused_reference(ref, mask, mean_ref, t), (g * ref + (1 - g) * mean_ref) * mask)


@pytest.mark.parametrize("mode", ["ml", "em", "pf"])
def test_convert_draws_noise_like_the_official_sampler(mode):
    m = tiny_diffvc(gate=0.01)  # open attention gates and a large score make an untrained sampler diverge
    with torch.no_grad():
        m.decoder.estimator.final_conv.weight.mul_(1e-3)
    src = torch.randn(2, 80, 30)
    ref = torch.randn(2, 80, 18)
    lens, rlens = torch.tensor([30, 26]), torch.tensor([18, 15])
    c = F.normalize(torch.rand(2, 256), dim=-1)
    y1 = m.convert(src, lens, ref, rlens, c, 4, mode, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)  # the official code draws from the global RNG: same order and shapes
    y2 = m.convert(src, lens, ref, rlens, c, 4, mode)
    assert y1.shape == (2, 80, 30)
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y2)
    # count the draws: start noise (b, 80, 32) then one per step for em/ml
    g = torch.Generator().manual_seed(7)
    expected_draws = 1 + (4 if mode != "pf" else 0)
    for _ in range(expected_draws):
        torch.randn((2, 80, 32), generator=g)
    g2 = torch.Generator().manual_seed(7)
    m.convert(src, lens, ref, rlens, c, 4, mode, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())


def test_channels_last_score_matches_nchw():
    """The channels-last fast path (attention as matmuls on the memory's order, NCHW RefBlock) computes the same
    score, contexts and features as the plain layout, and gradients w.r.t. the reference agree."""
    from cloak.bundle import prepare_diffvc

    plain = tiny_diffvc(gate=0.5)
    fast = tiny_diffvc(gate=0.5)
    fast.load_state_dict(plain.state_dict())
    prepare_diffvc(fast)  # the layout load_models gives
    assert fast.decoder.estimator.final_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, mean = torch.randn(2, 80, 64), torch.randn(2, 80, 64)
    mask = torch.ones(2, 1, 64)
    ref = torch.randn(2, 1, 80, 96, requires_grad=True)
    rmask = torch.ones(2, 1, 96)
    c, t = F.normalize(torch.randn(2, 256), dim=-1), torch.rand(2)
    outs = []
    for model in (plain, fast):
        s, internals = model.score(x, mask, mean, ref, rmask, c, t, return_internals=True)
        g, = torch.autograd.grad(s.square().sum(), ref)
        outs.append((s, internals, g))
    (s1, i1, g1), (s2, i2, g2) = outs
    assert torch.allclose(s1, s2, atol=1e-4, rtol=1e-4)
    assert torch.allclose(g1, g2, atol=1e-4, rtol=1e-3)
    for k in i1.contexts:
        assert torch.allclose(i1.contexts[k], i2.contexts[k], atol=1e-5, rtol=1e-4)
    for k in i1.features:
        assert i2.features[k].is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(i1.features[k], i2.features[k], atol=1e-4, rtol=1e-4)


def test_sample_cosine_equals_flattened_cosine():
    from cloak.losses import sample_cosine

    a = torch.randn(3, 8, 10, 12).contiguous(memory_format=torch.channels_last)
    b = torch.randn(3, 8, 10, 12)
    want = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    assert torch.allclose(sample_cosine(a, b), want, atol=1e-6)
    assert torch.allclose(sample_cosine(a, a), torch.ones(3), atol=1e-6)


def test_score_loss_is_an_rms_independent_of_length_and_mask():
    from cloak.losses import score_loss

    for frames in (48, 192):
        s = torch.full((2, 80, frames), 3.0)
        mask = torch.ones(2, 1, frames)
        assert score_loss(s, mask).item() == pytest.approx(3.0)
        mask[:, :, frames // 2:] = 0  # padding does not dilute it
        assert score_loss(s, mask).item() == pytest.approx(3.0)
    z = torch.randn(4, 80, 192, generator=torch.Generator().manual_seed(0))
    assert score_loss(z, torch.ones(4, 1, 192)).item() == pytest.approx(1.0, abs=0.02)  # the score near t=1: ~-z/sigma


def test_spectrum_term_is_the_error_of_the_implied_x0_long_term_spectrum():
    """`loss_t(spectrum_weight=var/gamma^2)` adds exactly the squared error of the long-term (time-mean) spectrum of
    the x_0 that the score implies, per mel bin, padding excluded; the plain loss is unchanged without it."""
    m = tiny_diffvc(seed=3)
    dec = m.decoder
    g = torch.Generator().manual_seed(0)
    b, n, frames = 2, 80, 32
    x0 = torch.randn(b, n, frames, generator=g) - 4.0
    mean = torch.randn(b, n, frames, generator=g) - 4.0
    ref, mean_ref = torch.randn(b, n, frames, generator=g) - 4.0, torch.randn(b, n, frames, generator=g) - 4.0
    c = torch.randn(b, 256, generator=g)
    mask = torch.ones(b, 1, frames)
    mask[1, :, 20:] = 0  # the second sample is padded
    x0, mean = x0 * mask, mean * mask
    t = torch.tensor([0.55, 0.8])
    w = (dec.variance(t) / dec.get_gamma(0, t) ** 2).flatten()

    def run(**kw):
        return dec.loss_t(x0, mask, mean, ref, mean_ref, c, t, ref_mask=torch.ones(b, 1, frames),
                          generator=torch.Generator().manual_seed(7), **kw)

    plain, both = run(), run(spectrum_weight=w)
    # independently: the same noise, the score, x0_hat = (x_t - (1 - gamma) mean + var * score) / gamma
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    gamma, var = dec.get_gamma(0, t), dec.variance(t)
    xt = (x0 * gamma + mean * (1 - gamma) + z * var.sqrt()) * mask
    xt_ref = dec.compute_diffused_mean(ref, torch.ones(b, 1, frames), mean_ref, t).unsqueeze(1)
    score = dec.estimator(xt, mask, mean, xt_ref, torch.ones(b, 1, frames), c, t)
    x0_hat = (xt - (1 - gamma) * mean + var * score) / gamma
    ltas_err = [((x0_hat[i] - x0[i]) * mask[i]).sum(-1) / mask[i].sum() for i in range(b)]
    expected = torch.stack([e.pow(2).mean() for e in ltas_err]).mean()
    assert (both - plain).item() == pytest.approx(expected.item(), rel=1e-4)
    assert run(weight=torch.ones(b)).item() == pytest.approx(plain.item(), rel=1e-6)
