"""FastComposer-style multimodal prompt: the text-encoder output at a subject's class-word
token is replaced by an MLP of [text embedding, image feature]."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .casting import linear


class FusionMLP(nn.Module):
    """fused = text + fc2(gelu(fc1(concat(layernorm(text), image)))).

    The residual form with a zero-initialised fc2 makes a fresh adapter return the text
    embedding unchanged, so an untrained adapter cannot move the picture.
    """

    def __init__(self, text_dim: int = 768, image_dim: int = 768, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        self.text_dim, self.image_dim, self.hidden_dim = text_dim, image_dim, hidden_dim
        self.norm = nn.LayerNorm(text_dim)
        self.fc1 = nn.Linear(text_dim + image_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, text_dim)

    @torch.no_grad()
    def reset_fresh(self, generator: torch.Generator | None = None) -> None:
        self.norm.reset_parameters()
        self.fc1.weight.normal_(0.0, self.fc1.in_features ** -0.5, generator=generator)
        self.fc1.bias.zero_()
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text [..., T], image [..., I] (broadcast over the token axis) -> [..., T]."""
        image = image.to(text.dtype).expand(*text.shape[:-1], image.shape[-1])
        normed = F.layer_norm(text, (self.text_dim,), self.norm.weight.to(text), self.norm.bias.to(text))
        h = F.gelu(linear(torch.cat([normed, image], dim=-1), self.fc1))
        return text + linear(h, self.fc2)


def fuse_prompt(fusion: FusionMLP, plain: torch.Tensor,
                bindings: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Return a copy of `plain` [L, T] whose bound token positions hold the fused embeddings.

    bindings: per subject, (token positions in the flattened prompt, image feature [I]).
    """
    fused = plain.clone()
    for positions, feature in bindings:
        if not positions:
            continue
        idx = torch.tensor(positions, dtype=torch.long, device=plain.device)
        fused[idx] = fusion(plain[idx].float(), feature.float().to(plain.device)).to(plain.dtype)
    return fused
