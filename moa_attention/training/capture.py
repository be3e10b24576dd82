"""The trainer's observer of the MoA layers: it keeps each layer's routed share, and for
cross-attention layers the attention maps of the subject tokens, for the losses.

Inference never pays for this: the layer only emits events; computing attention maps is
done here, when the trainer listens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.call_state import LayerEvent, halving_grid
from ..engine.masks import share_on_latent


def subject_attention_maps(q: torch.Tensor, k: torch.Tensor, heads: int,
                           subject_tokens: list[list[list[int]]]) -> list[list[torch.Tensor]]:
    """Cross-attention probability of every pixel for each subject's tokens, head-averaged:
    per row, per subject, [N]."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1).mean(dim=1)   # [b, n, L]
    return [[probs[r, :, pos].sum(dim=-1) for pos in subject_tokens[r]] for r in range(b)]


@dataclass
class Captured:
    path: str
    kind: str
    share: torch.Tensor                          # [R, N, 1], with gradient
    maps: list[list[torch.Tensor]] | None        # per row, per subject, [N]; attn2 only


class LossCapture:
    def __init__(self, subject_tokens: list[list[list[int]]]) -> None:
        self.subject_tokens = subject_tokens
        self.layers: list[Captured] = []

    def __call__(self, event: LayerEvent) -> None:
        maps = None
        if event.kind == "attn2" and event.query is not None and self.subject_tokens:
            maps = subject_attention_maps(event.query, event.key, event.heads, self.subject_tokens)
        self.layers.append(Captured(event.path, event.kind, event.share, maps))


def share_map(captured: list[Captured], latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] the personalized share averaged over every captured layer, each layer's grid
    brought to the latent's size (bilinear), detached: the map the metrics judge."""
    total = None
    with torch.no_grad():
        for c in captured:
            grid = share_on_latent(c.share, halving_grid(c.share.shape[1], latent_hw), latent_hw)
            total = grid if total is None else total + grid
    if total is None:
        raise ValueError("no MoA layer ran: nothing to average")
    return total / len(captured)
