"""Evaluation numbers as text, CSV/JSON values and a small comparison grid (pure torch).

The node and the command line print the same table with the same rules: +inf (a PSNR where
nothing changed) is written `inf`, a number that could not be computed `n/a` in text and empty
in CSV, and null in JSON (where +inf is the string "inf": strict JSON has no infinity)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..engine.masks import resize_mask

# (key, column title, digits, how to read it) in the order every report shows them
METRICS: tuple[tuple[str, str, int, str], ...] = (
    ("identity_arcface", "id ArcFace", 3, "cosine of ArcFace face embeddings, reference vs picture (higher = same person)"),
    ("identity_clip", "id CLIP", 3, "cosine of CLIP image embeddings of the masked subject crops (higher = same subject)"),
    ("prompt_clip", "prompt CLIP", 3, "cosine of CLIP image and prompt embeddings (higher = follows the prompt)"),
    ("change_inside", "chg in", 4, "mean |picture - baseline| inside the subject mask"),
    ("change_outside", "chg out", 4, "mean |picture - baseline| outside it (0 = context kept)"),
    ("psnr_inside", "PSNR in", 2, "PSNR in dB inside the subject mask"),
    ("psnr_outside", "PSNR out", 2, "PSNR in dB outside it (inf = context unchanged)"),
    ("ssim_inside", "SSIM in", 3, "SSIM inside the subject mask"),
    ("ssim_outside", "SSIM out", 3, "SSIM outside it (1 = context unchanged)"),
    ("latent_change_inside", "lat chg in", 4, "mean |latent - baseline latent| inside the subject mask"),
    ("latent_change_outside", "lat chg out", 4, "the same outside it (0 = context kept)"),
    ("router_subject_share", "router subj", 3, "router's personalized share inside the subject mask"),
    ("router_background_share", "router bg", 3, "router's personalized share outside it (0 = prior keeps the context)"),
    ("router_auroc", "router AUROC", 3, "how well the router's share separates subject from context (1 = perfectly)"),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def format_value(x, digits: int = 3) -> str:
    """Text: `inf` for infinities, `n/a` for a missing or NaN value."""
    if not is_number(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def csv_value(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return str(x)


def json_value(x):
    """Strict JSON: NaN -> null, +-inf -> "inf"/"-inf"."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x


def mean_of(values) -> float:
    """Mean of the numbers (NaN and None skipped; any +inf makes it +inf). NaN when none."""
    nums = [float(v) for v in values if is_number(v)]
    return sum(nums) / len(nums) if nums else float("nan")


def text_table(rows: list[dict], label_key: str = "label") -> str:
    """A fixed-width table of the metrics that any row has, one line per row, then the mean."""
    keys = [m for m in METRICS if any(is_number(r.get(m[0])) for r in rows)]
    if not keys:
        return ("no numbers: they need a baseline and a subject mask, references with a face model or a CLIP vision "
                "model, a prompt with a text encoder, or router maps")
    labels = [str(r.get(label_key, i + 1)) for i, r in enumerate(rows)]
    lw = max(5, *(len(s) for s in labels))
    head = "image".ljust(lw) + "".join(f"  {t:>12}" for _, t, _, _ in keys)
    lines = [head]
    for label, r in zip(labels, rows):
        lines.append(label.ljust(lw) + "".join(f"  {format_value(r.get(k), d):>12}" for k, _, d, _ in keys))
    if len(rows) > 1:
        lines.append("mean".ljust(lw) + "".join(f"  {format_value(mean_of(r.get(k) for r in rows), d):>12}"
                                                for k, _, d, _ in keys))
    lines.append("")
    lines += [f"{t}: {how}" for _, t, _, how in keys]
    return "\n".join(lines)


# ------------------------------------------------------------------ the comparison grid

def _tile(image: torch.Tensor | None, tile: int) -> torch.Tensor:
    """[H, W, 3|1] or [H, W] in [0, 1] -> [tile, tile, 3], fitted with dark padding; None -> dark."""
    out = torch.full((tile, tile, 3), 0.12)
    if image is None:
        return out
    x = image.detach().float().cpu()
    if x.ndim == 2:
        x = x[..., None]
    x = x[..., :3].expand(*x.shape[:2], 3) if x.shape[-1] == 1 else x[..., :3]
    h, w = x.shape[:2]
    s = tile / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=s < 1)[0].permute(1, 2, 0).clamp(0, 1)
    oy, ox = (tile - nh) // 2, (tile - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = x
    return out


def mask_outline(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[H, W] mask -> [H, W] 1 on the mask's border."""
    m = (mask.float() > 0.5).float()[None, None]
    k = 2 * width + 1
    grown = F.max_pool2d(m, k, 1, width)
    shrunk = -F.max_pool2d(-m, k, 1, width)
    return (grown - shrunk)[0, 0]


def difference_image(baseline: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None = None,
                     gain: float = 4.0) -> torch.Tensor:
    """[H, W, 3]: |other - baseline| (times `gain`, white = changed, black = kept) with the subject
    mask's outline in green."""
    d = ((other.float() - baseline.float()).abs().mean(dim=-1) * gain).clamp(0, 1)
    out = d[..., None].expand(*d.shape, 3).clone()
    if mask is not None:
        edge = mask_outline(resize_mask(mask, d.shape)) > 0
        out[edge] = torch.tensor([0.1, 0.9, 0.2])
    return out


def comparison_grid(rows: list[list[torch.Tensor | None]], tile: int = 128, gap: int = 4) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: one row of tiles per picture (columns as given; None = dark tile)."""
    if not rows or not rows[0]:
        return torch.zeros(1, tile, tile, 3)
    cols = max(len(r) for r in rows)
    h = len(rows) * tile + (len(rows) + 1) * gap
    w = cols * tile + (cols + 1) * gap
    grid = torch.full((h, w, 3), 0.05)
    for i, row in enumerate(rows):
        for j in range(cols):
            y, x = gap + i * (tile + gap), gap + j * (tile + gap)
            grid[y:y + tile, x:x + tile] = _tile(row[j] if j < len(row) else None, tile)
    return grid[None]
