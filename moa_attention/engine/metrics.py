"""Numbers for MoA's claims, in pure torch: where the router sends pixels, and what changed
inside vs outside a subject. Shared by the trainer, the toy-world experiment and the
evaluation nodes, so every report computes them the same way."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` predicting binary `labels` (any shapes, same numel):
    1 = every subject pixel scores above every background pixel, 0.5 = chance. NaN when one
    class is absent. Ties count half (the Mann-Whitney U statistic)."""
    s = scores.detach().flatten().double()
    y = labels.detach().flatten() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=s.dtype)
    sorted_s = s[order]                                   # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[y].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] mask in [0, 1] -> [..., h, w] (area-averaged when shrinking)."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask.float()
    lead = mask.shape[:-2]
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    mode = "area" if m.shape[-2] >= hw[0] and m.shape[-1] >= hw[1] else "bilinear"
    out = F.interpolate(m, size=hw, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out.reshape(*lead, *hw)


def change_inside_outside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean absolute difference of a and b ([B, C, H, W] latents/images, or [B, H, W, C] IMAGE
    when channels_last) inside and outside `mask` ([B, H, W] or [H, W], resized to fit).
    NaN for a side with no pixel."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {list(a.shape)} and {list(b.shape)}")
    diff = (a.float() - b.float()).abs()
    if diff.ndim == 4 and diff.shape[-1] in (1, 3, 4) and diff.shape[1] not in (1, 3, 4):
        diff = diff.permute(0, 3, 1, 2)                   # IMAGE [B, H, W, C] -> [B, C, H, W]
    per_pixel = diff.mean(dim=1) if diff.ndim == 4 else diff      # [B, H, W]
    m = resize_mask(mask, per_pixel.shape[-2:])
    m = m.expand_as(per_pixel) if m.ndim == 2 or m.shape[0] == 1 else m
    inside, outside = m.sum().item(), (1 - m).sum().item()
    return ((per_pixel * m).sum().item() / inside if inside > 0 else float("nan"),
            (per_pixel * (1 - m)).sum().item() / outside if outside > 0 else float("nan"))


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the pixels where `mask` is 1 (all when None);
    identical inputs give +inf."""
    err = (a.float() - b.float()) ** 2
    if err.ndim == 4 and err.shape[-1] in (1, 3, 4) and err.shape[1] not in (1, 3, 4):
        err = err.permute(0, 3, 1, 2)
    per_pixel = err.mean(dim=1) if err.ndim == 4 else err
    if mask is None:
        mse = per_pixel.mean().item()
    else:
        m = resize_mask(mask, per_pixel.shape[-2:]).expand_as(per_pixel)
        if m.sum() <= 0:
            return float("nan")
        mse = ((per_pixel * m).sum() / m.sum()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak ** 2 / mse)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two feature vectors (flattened)."""
    return F.cosine_similarity(a.detach().flatten().float(), b.detach().flatten().float(), dim=0).item()
