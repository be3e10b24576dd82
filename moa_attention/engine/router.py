"""The per-pixel router that decides, in each attention layer, how much of every pixel
comes from the personalized expert and how much from the frozen prior."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .casting import linear

#: Logit margin of a fresh router: softmax([4, 0]) gives the prior ~98% of every pixel, so
#: an untrained adapter starts as (almost) the base model instead of a 50/50 blend.
FRESH_PRIOR_MARGIN = 4.0


class Router(nn.Module):
    """C -> C/4 -> 2 MLP with GELU (the spec's choice); logits are [prior, personal]."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(dim // 4, 1)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def reset_fresh(self, generator: torch.Generator | None = None, margin: float = FRESH_PRIOR_MARGIN) -> None:
        """Small random first layer, zero second layer, bias `margin` towards the prior."""
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, self.fc1.in_features ** -0.5, generator=generator)
            self.fc1.bias.zero_()
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([float(margin), 0.0]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 for the softmax: fp16 logits of a 4-unit margin lose the small shares
        h = F.gelu(linear(x, self.fc1))
        return linear(h, self.fc2).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Personalized share per pixel in [0, 1], shape [..., N, 1], float32."""
        return torch.softmax(self.logits(x), dim=-1)[..., 1:2]


def apply_strength(share: torch.Tensor, strength: float) -> torch.Tensor:
    """Scale the personalized share and renormalise against the prior share.

    strength 0 gives exactly 0 (pure prior), 1 leaves the router's decision unchanged, and
    values above 1 push undecided pixels towards the subject without touching pixels the
    router gave fully to the prior (their share stays 0).
    """
    if strength == 1.0:
        return share
    if strength == 0.0:
        return torch.zeros_like(share)
    scaled = share * strength
    return scaled / (scaled + (1.0 - share)).clamp_min(1e-12)


def hard_route(share: torch.Tensor) -> torch.Tensor:
    """Top-1 routing: each pixel goes wholly to the expert with the larger share."""
    return (share > 0.5).to(share.dtype)
