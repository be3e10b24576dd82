"""An SD-style attention in plain torch for the engine tests: to_q/to_k/to_v/to_out and heads are
all the engine needs of an attention module (no ComfyUI is imported)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

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
