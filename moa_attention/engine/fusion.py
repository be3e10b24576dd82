"""FastComposer-style multimodal prompt: the text-encoder output at a subject's class-word
token is replaced by an MLP of [text embedding, image feature].

An adapter may give each subject several identity tokens (`tokens` > 1): the first replaces the
class word as in FastComposer, the others are appended after the prompt. One fused token gives
the personalized cross-attention one identity value per head, so every subject pixel can only
take more or less of the same vector; with several, each pixel's query picks between them
(the toy world's subjects are two colours in a pattern: docs/training.md, "Identity tokens")."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .casting import linear


class FusionMLP(nn.Module):
    """fused_k = text + fc2_k(gelu(fc1(concat(layernorm(text), image)))), k < tokens.

    The residual form with a zero-initialised fc2 makes a fresh adapter return the text
    embedding unchanged (with one token it cannot move the picture at all).

    `streams`: the widths of the text encoders whose outputs sit side by side in a token (SD1.5:
    768; SDXL: 768 + 1280). Each slice is normalised on its own, because the two SDXL encoders'
    outputs live on very different scales; `norm` holds one weight and bias per channel either way.
    """

    def __init__(self, text_dim: int = 768, image_dim: int = 768, hidden_dim: int | None = None,
                 streams: tuple[int, ...] | None = None, tokens: int = 1) -> None:
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        streams = tuple(streams or (text_dim,))
        if sum(streams) != text_dim:
            raise ValueError(f"text streams {streams} do not add up to the text width {text_dim}")
        if tokens < 1:
            raise ValueError(f"a subject needs at least one identity token, got {tokens}")
        self.text_dim, self.image_dim, self.hidden_dim, self.streams = text_dim, image_dim, hidden_dim, streams
        self.tokens = tokens
        self.norm = nn.LayerNorm(text_dim)
        self.fc1 = nn.Linear(text_dim + image_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, text_dim * tokens)

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
        """text [..., T], image [..., I] (broadcast over the token axis) -> [..., tokens, T]."""
        image = image.to(text.dtype).expand(*text.shape[:-1], image.shape[-1])
        h = F.gelu(linear(torch.cat([self.normalise(text), image], dim=-1), self.fc1))
        return text.unsqueeze(-2) + linear(h, self.fc2).unflatten(-1, (self.tokens, self.text_dim))


def fuse_prompt(fusion: FusionMLP, plain: torch.Tensor,
                bindings: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The prompt the personalized cross-attention sees: a copy of `plain` [L, T] whose bound
    token positions hold their first fused token, followed by each bound subject's further
    identity tokens (fused at its last class-word position, which a causal text encoder has
    given the whole word): [L + (tokens - 1) * subjects, T].

    bindings: per subject, (token positions in the flattened prompt, image feature [I]).
    """
    fused, extra = plain.clone(), []
    for positions, feature in bindings:
        if not positions:
            continue
        idx = torch.tensor(positions, dtype=torch.long, device=plain.device)
        tokens = fusion(plain[idx].float(), feature.float().to(plain.device)).to(plain.dtype)
        fused[idx] = tokens[:, 0]
        if fusion.tokens > 1:
            extra.append(tokens[-1, 1:])
    return torch.cat([fused, *extra]) if extra else fused


def identity_rows(positions: list[list[int]], length: int, tokens: int) -> list[list[int]]:
    """Each subject's rows in fuse_prompt's output for a prompt of `length` rows: its class-word
    positions, then its further identity tokens (subjects without positions get none)."""
    rows, next_row = [], length
    for p in positions:
        extra = list(range(next_row, next_row + tokens - 1)) if p else []
        next_row += len(extra)
        rows.append(list(p) + extra)
    return rows


def stack_prompts(prompts: list[torch.Tensor], length: int) -> torch.Tensor:
    """[B, L_max, T] fused prompts of one batch, each `length` prompt rows followed by its
    identity tokens. With several identity tokens per subject a prompt with fewer subjects is
    shorter; it is padded by repeating its last prompt row (a padding token's output, of which a
    CLIP prompt already holds dozens), never an identity token."""
    longest = max(p.shape[0] for p in prompts)
    return torch.stack([p if p.shape[0] == longest else
                        torch.cat([p, p[length - 1:length].expand(longest - p.shape[0], -1)]) for p in prompts])
