"""Numbers for MoA's claims, in pure torch: where the router sends pixels, and what changed
inside vs outside a subject. Shared by the trainer, the toy-world experiment and the
evaluation nodes, so every report computes them the same way."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from ..engine.masks import resize_mask


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


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] (C in 1, 3, 4 and H not) -> [B, C, H, W]; latents [B, C, H, W] and
    anything that is not 4-d pass through."""
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.permute(0, 3, 1, 2)
    return x


def _mask_like(mask: torch.Tensor, per_pixel: torch.Tensor) -> torch.Tensor:
    """mask [B, H, W] / [1, H, W] / [H, W] resized and broadcast to per_pixel [B, h, w]."""
    m = resize_mask(mask.to(per_pixel.device), per_pixel.shape[-2:])
    return m.expand_as(per_pixel) if m.ndim == 2 or m.shape[0] == 1 else m


def change_inside_outside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean absolute difference of a and b ([B, C, H, W] latents/images, or [B, H, W, C] IMAGE
    when channels_last) inside and outside `mask` ([B, H, W] or [H, W], resized to fit).
    NaN for a side with no pixel."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {list(a.shape)} and {list(b.shape)}")
    diff = channels_first((a.float() - b.float()).abs())
    per_pixel = diff.mean(dim=1) if diff.ndim == 4 else diff      # [B, H, W]
    m = _mask_like(mask, per_pixel)
    inside, outside = m.sum().item(), (1 - m).sum().item()
    return ((per_pixel * m).sum().item() / inside if inside > 0 else float("nan"),
            (per_pixel * (1 - m)).sum().item() / outside if outside > 0 else float("nan"))


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the pixels where `mask` is 1 (all when None);
    identical inputs give +inf."""
    err = channels_first((a.float() - b.float()) ** 2)
    per_pixel = err.mean(dim=1) if err.ndim == 4 else err
    if mask is None:
        mse = per_pixel.mean().item()
    else:
        m = _mask_like(mask, per_pixel)
        if m.sum() <= 0:
            return float("nan")
        mse = ((per_pixel * m).sum() / m.sum()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak ** 2 / mse)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two feature vectors (flattened)."""
    return F.cosine_similarity(a.detach().flatten().float(), b.detach().flatten().float(), dim=0).item()


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def ssim_map(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0, window: int = 11,
             sigma: float = 1.5) -> torch.Tensor:
    """[B, H, W] structural similarity per pixel (Wang et al. 2004: Gaussian window 11, sigma 1.5,
    K1 0.01, K2 0.03), averaged over channels. Inputs as in `psnr`. The window is shrunk for
    images smaller than it and borders are reflect-padded, so every pixel has a value and a mask
    can select any of them. 1 = identical neighbourhoods."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {list(a.shape)} and {list(b.shape)}")
    x, y = channels_first(a.float()), channels_first(b.float())
    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    if x.ndim != 4:
        raise ValueError(f"ssim needs [B, C, H, W] or [B, H, W, C] images, got shape {list(a.shape)}")
    bsz, ch, h, w = x.shape
    size = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"image of {w}x{h} pixels is too small for SSIM")
    g = _gaussian_window(size, sigma * size / window, x.device)
    kernel = (g[:, None] * g[None, :]).expand(ch, 1, size, size)
    pad = size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode="reflect") if pad else t
        return F.conv2d(t, kernel, groups=ch)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=1)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, peak: float = 1.0) -> float:
    """Mean SSIM over the pixels where `mask` is 1 (all when None); 1.0 for identical inputs,
    NaN when the mask selects no pixel. Masked SSIM averages the full image's SSIM map over the
    mask, so windows at the mask's edge also see a few pixels across it."""
    s = ssim_map(a, b, peak)
    if mask is None:
        return s.mean().item()
    m = _mask_like(mask, s)
    if m.sum() <= 0:
        return float("nan")
    return ((s * m).sum() / m.sum()).item()


@dataclass(frozen=True)
class ContextScores:
    """How much a picture changed against its baseline (same seed without the subject, or strength
    0), inside the subject's mask and outside it (the context MoA should keep)."""
    change_inside: float
    change_outside: float
    psnr_inside: float = float("nan")
    psnr_outside: float = float("nan")
    ssim_inside: float = float("nan")
    ssim_outside: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def context_preservation(baseline: torch.Tensor, other: torch.Tensor, mask: torch.Tensor,
                         peak: float | None = 1.0) -> ContextScores:
    """Change of `other` against `baseline` inside and outside `mask` (1 = subject).

    Images (IMAGE [B, H, W, 3] in [0, 1], or [B, C, H, W]): mean absolute change, masked PSNR
    (dB, +inf where nothing changed) and masked SSIM on each side (1 where nothing changed; each
    side's SSIM is taken with the other side pasted from the baseline). Latents: pass peak=None, and
    only the mean change is computed (a latent has no fixed peak for PSNR, and SSIM's constants
    assume one)."""
    inside, outside = change_inside_outside(baseline, other, mask)
    if peak is None:
        return ContextScores(inside, outside)
    m = mask.float()
    base, pic = channels_first(baseline.float()), channels_first(other.float())
    if base.ndim != 4:
        raise ValueError(f"context preservation needs images [B, H, W, C] or [B, C, H, W], got {list(baseline.shape)}")
    side = resize_mask(m.to(base.device), base.shape[-2:])
    side = side[:, None] if side.ndim == 3 else side[None, None]
    # each side's SSIM sees only that side's changes: the other side is taken from the baseline, so
    # windows at the mask's edge do not count the subject's change as a change of the context
    only_inside = base + side * (pic - base)
    only_outside = pic + side * (base - pic)
    return ContextScores(inside, outside,
                         psnr(baseline, other, m, peak), psnr(baseline, other, 1 - m, peak),
                         ssim(base, only_inside, m, peak), ssim(base, only_outside, 1 - m, peak))


@dataclass(frozen=True)
class RouterShares:
    """The personalized share from MoA Router Maps (0 = base model, 1 = subject expert)."""
    subject_share: float          # mean share inside the subject mask (high is right)
    background_share: float       # mean share outside it (low is right: the prior keeps the context)
    auroc: float                  # how well the share separates subject from background (1 = perfectly)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def router_shares(share: torch.Tensor, mask: torch.Tensor) -> RouterShares:
    """share [B, H, W] or [H, W] in [0, 1]; mask (1 = subject) of any size (resized to the share)."""
    s = share.float()
    s = s[None] if s.ndim == 2 else s
    m = _mask_like(mask.float(), s)
    hard = (m > 0.5).float()
    inside, outside = hard.sum().item(), (1 - hard).sum().item()
    return RouterShares((s * hard).sum().item() / inside if inside else float("nan"),
                        (s * (1 - hard)).sum().item() / outside if outside else float("nan"),
                        auroc(s, hard))
