"""Pure-torch attention with ComfyUI's calling convention (q/k/v are [B, N, heads*dim]).

ComfyUI passes its own `optimized_attention` into the MoA layer so the personalized expert
runs the very kernel the prior runs; this one serves the trainer and plain-torch use."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:
        mask = mask[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, inner)
