"""Sparse soft routing in plain torch: the personalized expert computed only for the pixels whose
share is above MoASettings.sparse_threshold, the others taking the prior's output exactly.

What it must keep: threshold 0 is dense soft routing bit for bit; a router that routes a known set
of pixels (shares 0 or 1) gives dense soft's result; a skipped pixel is the prior's output bit for
bit and differs from dense soft by share * |personal - prior| (so by at most threshold * that);
strength 0 and a fresh adapter give the prior bit for bit; rows without a subject stay prior."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
from comfyui_moa.moa_attention.engine.call_state import STATE_KEY, CallState, MoASettings
from comfyui_moa.moa_attention.engine.layer import MoAAttention, install_layers

from support.sd_attention import CTX, DIM, Attention


class Net(nn.Module):
    """A self- and a cross-attention with residuals on an 8x8 token grid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.attn1 = Attention(DIM)
        self.block.attn2 = Attention(DIM, CTX)

    def forward(self, x, context, transformer_options=None):
        opts = transformer_options or {}
        x = x + self.block.attn1(x, transformer_options=opts)
        return x + self.block.attn2(x, context=context, transformer_options=opts)


def adapter_for(net, expert="lowrank", perturbed=True, router=None):
    """router: None = fresh (share ~0.018), "personal" = share 1, "random" = shares spread over (0, 1)."""
    ad = init_adapter_from_unet(net, expert=expert, rank=4, seed=0)
    g, g_router = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for w in ad.layers.values():
        if perturbed:
            for p in w.expert.parameters():
                p.data.add_(torch.randn(p.shape, generator=g) * 0.3)
        if router == "personal":
            w.router.fc2.weight.data.zero_()
            w.router.fc2.bias.data = torch.tensor([-50.0, 50.0])
        elif router == "random":
            w.router.fc2.weight.data = torch.randn(w.router.fc2.weight.shape, generator=g_router) * 6.0
            w.router.fc2.bias.data = torch.tensor([2.0, 0.0])
    return ad


def run(net, ad, x, ctx, state):
    uninstall = install_layers(net, ad)
    try:
        with torch.no_grad():
            return net(x, ctx, {STATE_KEY: state})
    finally:
        uninstall()


def state(ctx, threshold=0.0, strength=1.0, regions=None, first_row=0, observers=()):
    return CallState.whole_batch(ctx, (8, 8), MoASettings(strength=strength, sparse_threshold=threshold),
                                 observers=observers, regions=regions, first_row=first_row)


@pytest.fixture
def net():
    return Net().eval()


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, DIM, generator=g), torch.randn(batch, 5, CTX, generator=g)


def test_threshold_zero_is_dense_soft_routing_bit_for_bit(net):
    x, ctx = inputs()
    ad = adapter_for(net, router="random")
    dense = run(net, ad, x, ctx, CallState.whole_batch(ctx + 1, (8, 8)))
    assert torch.equal(run(net, ad, x, ctx, state(ctx + 1, threshold=0.0)), dense)
    assert not torch.equal(run(net, ad, x, ctx, state(ctx + 1, threshold=0.2)), dense)


@pytest.mark.parametrize("expert", ["lowrank", "full"])
def test_a_router_routing_known_pixels_gives_dense_soft_per_row(net, expert):
    """Shares exactly 0 (outside each row's region) or 1 (inside): nothing is skipped that dense
    soft mixes, so the two agree to float rounding; each row routes its own pixel set."""
    x, ctx = inputs()
    ad = adapter_for(net, expert, router="personal")
    regions = torch.zeros(2, 1, 8, 8)
    regions[0, :, :3] = 1.0
    regions[1, :, :, 5:] = 1.0
    dense = run(net, ad, x, ctx, state(ctx + 1, regions=regions))
    sparse = run(net, ad, x, ctx, state(ctx + 1, threshold=0.05, regions=regions))
    with torch.no_grad():
        prior = net(x, ctx)
    assert (dense - prior).abs().max() > 1e-2, "the expert must change the routed pixels"
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_rows_without_a_subject_stay_prior_bit_for_bit(net):
    x, ctx = inputs()
    ad = adapter_for(net, router="random")
    with torch.no_grad():
        prior = net(x, ctx)
    out = run(net, ad, x, ctx, state(ctx[1:] + 1, threshold=0.1, first_row=1))
    assert torch.equal(out[0], prior[0])
    assert (out[1] - prior[1]).abs().max() > 1e-2


def one_layer(net, ad, kind, x, ctx, settings, observers=()):
    """The layer's output, its prior's output and the routed shares [R, N] it reported."""
    prior_module = getattr(net.block, kind)
    layer = MoAAttention(prior_module, ad.layer(f"block.{kind}"), f"block.{kind}")
    shares = []
    st = CallState.whole_batch(ctx + 1, (8, 8), settings, observers=(lambda e: shares.append(e.share[..., 0]),))
    context = None if kind == "attn1" else ctx
    with torch.no_grad():
        return (layer(x, context=context, transformer_options={STATE_KEY: st}),
                prior_module(x, context=context), shares[0])


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.3])
def test_skipped_pixels_are_the_prior_and_the_difference_is_bounded_by_their_share(net, kind, threshold):
    """On a router with spread shares: a pixel with share s <= threshold is the prior's output bit
    for bit and differs from dense soft by exactly s * |personal - prior| (personal = the layer's
    output with share 1), so by at most threshold * max|personal - prior|; the other pixels are
    dense soft's to float rounding."""
    x, ctx = inputs(seed=3)
    ad = adapter_for(net, router="random")
    dense, prior, share = one_layer(net, ad, kind, x, ctx, MoASettings())
    sparse, _, effective = one_layer(net, ad, kind, x, ctx, MoASettings(sparse_threshold=threshold))
    skipped = share <= threshold
    assert 0.1 < skipped.float().mean() < 0.9, "the router must spread its shares around the threshold"
    assert torch.equal(effective, share.masked_fill(skipped, 0.0))          # what the router maps see
    assert torch.equal(sparse[skipped], prior[skipped])
    torch.testing.assert_close(sparse[~skipped], dense[~skipped], rtol=1e-5, atol=1e-6)
    personal, _, ones = one_layer(net, adapter_for(net, router="personal"), kind, x, ctx, MoASettings())
    assert ones.eq(1.0).all()
    expected = share[..., None] * (personal - prior)
    torch.testing.assert_close((dense - sparse)[skipped], expected[skipped], rtol=1e-4, atol=1e-6)
    assert (dense - sparse).abs().max() > 1e-4, "skipping must change something for the bound to mean anything"
    assert (dense - sparse).abs().max() <= threshold * (personal - prior).abs().max() + 1e-6


@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("router", [None, "personal"])
@pytest.mark.parametrize("threshold", [0.01, 0.05])
def test_fresh_adapter_is_the_prior_bit_for_bit_with_sparse_routing(net, expert, router, threshold):
    """A fresh router gives ~0.018: at 0.01 every pixel is computed by the expert, at 0.05 none."""
    x, ctx = inputs()
    with torch.no_grad():
        prior = net(x, ctx)
    ad = adapter_for(net, expert, perturbed=False, router=router)
    assert torch.equal(run(net, ad, x, ctx, state(ctx, threshold=threshold)), prior)


def test_strength_zero_is_the_prior_bit_for_bit_with_sparse_routing(net):
    x, ctx = inputs()
    with torch.no_grad():
        prior = net(x, ctx)
    ad = adapter_for(net, router="personal")
    assert (run(net, ad, x, ctx, state(ctx + 1, threshold=0.1)) - prior).abs().max() > 1e-2
    assert torch.equal(run(net, ad, x, ctx, state(ctx + 1, threshold=0.1, strength=0.0)), prior)


@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("routed", ["all", "half"])
def test_fresh_adapter_in_bf16_is_the_prior_bit_for_bit_for_a_part_of_the_batch(expert, routed):
    """Only the cond row of an [uncond, cond] batch is personalized, in bf16 at SD's width: the
    expert's part, run on the routed pixels' shape, must still give the prior's bits."""
    torch.manual_seed(0)
    m = nn.Module()
    m.block = nn.Module()
    m.block.attn2 = Attention(320, 768, heads=5)
    m = m.to(torch.bfloat16).eval()
    x, ctx = torch.randn(2, 256, 320).bfloat16(), torch.randn(2, 231, 768).bfloat16()
    with torch.no_grad():
        base = m.block.attn2(x, context=ctx)
    ad = adapter_for(m, expert, perturbed=False, router="personal")
    region = torch.ones(1, 1, 16, 16)
    if routed == "half":
        region[..., 5:] = 0.0
    st = CallState.whole_batch(ctx[1:], (16, 16), MoASettings(sparse_threshold=0.05), regions=region, first_row=1)
    uninstall = install_layers(m, ad)
    try:
        with torch.no_grad():
            out = m.block.attn2(x, context=ctx, transformer_options={STATE_KEY: st})
    finally:
        uninstall()
    assert torch.equal(out, base)
