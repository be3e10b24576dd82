"""An SD-style attention and a two-level net of them in plain torch for the engine tests:
to_q/to_k/to_v/to_out and heads are all the engine needs of an attention module (no ComfyUI is
imported)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from comfyui_moa.moa_attention.engine.call_state import STATE_KEY
from comfyui_moa.moa_attention.engine.layer import install_layers

DIM, CTX, HEADS = 16, 24, 2


class Attention(nn.Module):
    """q/k/v/out projections around scaled_dot_product_attention, as SD1.5's CrossAttention."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = HEADS) -> None:
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        q = self.to_q(x)
        ctx = x if context is None else context
        k, v = self.to_k(ctx), self.to_v(ctx if value is None else value)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = Attention(DIM)
        self.attn2 = Attention(DIM, CTX)

    def forward(self, x, context, transformer_options):
        x = x + self.attn1(x, transformer_options=transformer_options)
        return x + self.attn2(x, context=context, transformer_options=transformer_options)


class TinyNet(nn.Module):
    """Two levels of transformer blocks on an 8x8 and a 4x4 token grid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x, context, transformer_options=None):
        opts = transformer_options or {}
        x = self.blocks[0](x, context, opts)
        b, n, c = x.shape
        small = F.avg_pool2d(x.transpose(1, 2).reshape(b, c, 8, 8), 2).flatten(2).transpose(1, 2)
        return self.blocks[1](small, context, opts)


def force_router(ad, personal: bool):
    for w in ad.layers.values():
        w.router.fc2.weight.data.zero_()
        w.router.fc2.bias.data = torch.tensor([-50.0, 50.0] if personal else [50.0, -50.0])


def perturb(ad, scale=0.3):
    g = torch.Generator().manual_seed(1)
    for w in ad.layers.values():
        for p in w.expert.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * scale)


def run(net, ad, x, ctx, state):
    uninstall = install_layers(net, ad)
    try:
        with torch.no_grad():
            return net(x, ctx, {STATE_KEY: state} if state is not None else None)
    finally:
        uninstall()
