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

    `streams`: the widths of the text encoders whose outputs sit side by side in a token (SD1.5:
    768; SDXL: 768 + 1280). Each slice is normalised on its own, because the two SDXL encoders'
    outputs live on very different scales; `norm` holds one weight and bias per channel either way.
    """

    def __init__(self, text_dim: int = 768, image_dim: int = 768, hidden_dim: int | None = None,
                 streams: tuple[int, ...] | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        streams = tuple(streams or (text_dim,))
        if sum(streams) != text_dim:
            raise ValueError(f"text streams {streams} do not add up to the text width {text_dim}")
        self.text_dim, self.image_dim, self.hidden_dim, self.streams = text_dim, image_dim, hidden_dim, streams
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

    def normalise(self, text: torch.Tensor) -> torch.Tensor:
        """LayerNorm of each text stream's slice of the token (the whole token for SD1.5)."""
        weight, bias = self.norm.weight.to(text), self.norm.bias.to(text)
        if len(self.streams) == 1:
            return F.layer_norm(text, (self.text_dim,), weight, bias)
        parts = zip(text.split(self.streams, dim=-1), weight.split(self.streams), bias.split(self.streams))
        return torch.cat([F.layer_norm(t, (t.shape[-1],), w, b) for t, w, b in parts], dim=-1)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text [..., T], image [..., I] (broadcast over the token axis) -> [..., T]."""
        image = image.to(text.dtype).expand(*text.shape[:-1], image.shape[-1])
        h = F.gelu(linear(torch.cat([self.normalise(text), image], dim=-1), self.fc1))
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
