"""MoA's training losses (see the spec): denoising, router and object loss."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..engine.call_state import halving_grid
from .capture import Captured


def masks_at(masks: torch.Tensor, n_tokens: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, S, H, W] latent-resolution masks -> [B, S, n_tokens] at a layer's token grid."""
    h, w = halving_grid(n_tokens, latent_hw)
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks, size=(h, w), mode="area")
    return masks.flatten(2)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, subject_masks: torch.Tensor | None = None,
                   subject_weight: float = 1.0) -> torch.Tensor:
    """Epsilon MSE; pixels inside any subject mask count `subject_weight` times."""
    err = (pred.float() - target.float()) ** 2
    if subject_masks is None or subject_weight == 1.0:
        return err.mean()
    union = subject_masks.amax(dim=1, keepdim=True)                        # [B, 1, H, W]
    weight = 1.0 + (subject_weight - 1.0) * union
    return (err * weight).sum() / (weight.sum() * err.shape[1])


def router_loss(captured: list[Captured], subject_masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mean personalized share on background pixels (outside every subject), over layers."""
    terms = []
    for c in captured:
        background = 1.0 - masks_at(subject_masks, c.share.shape[1], latent_hw).amax(dim=1)   # [B, N]
        terms.append((c.share[..., 0] * background).sum() / background.sum().clamp_min(1.0))
    return torch.stack(terms).mean() if terms else subject_masks.new_zeros(())


def object_loss(captured: list[Captured], subject_masks: torch.Tensor, subject_count: list[int],
                latent_hw: tuple[int, int]) -> torch.Tensor:
    """FastComposer's balanced L1: each subject token's cross-attention should sit inside its
    mask: mean attention outside minus mean attention inside, over layers and subjects."""
    terms = []
    for c in captured:
        maps = c.maps
        n = maps[0][0].shape[0] if maps and maps[0] else 0
        if n == 0:
            continue
        m = masks_at(subject_masks, n, latent_hw)                        # [B, S, N]
        for r, row_maps in enumerate(maps):
            for s, attn in enumerate(row_maps[: subject_count[r]]):
                fg, bg = m[r, s], 1.0 - m[r, s]
                terms.append((attn * bg).sum() / (bg.sum() + 1e-5) - (attn * fg).sum() / (fg.sum() + 1e-5))
    return torch.stack(terms).mean() if terms else subject_masks.new_zeros(())


def background_share(captured: list[Captured], subject_masks: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[float, float]:
    """(mean personalized share outside the subjects, inside them): the number to watch."""
    bg_terms, fg_terms = [], []
    with torch.no_grad():
        for c in captured:
            union = masks_at(subject_masks, c.share.shape[1], latent_hw).amax(dim=1)
            s = c.share[..., 0].float()
            bg_terms.append(((s * (1 - union)).sum() / (1 - union).sum().clamp_min(1.0)).item())
            fg_terms.append(((s * union).sum() / union.sum().clamp_min(1.0)).item())
    if not bg_terms:
        return float("nan"), float("nan")
    return sum(bg_terms) / len(bg_terms), sum(fg_terms) / len(fg_terms)
