"""Prepare subject reference images for the image encoder: remove the background with the
subject's mask, crop to the subject and centre it on a square canvas.

Images are ComfyUI IMAGE tensors [B, H, W, 3] in [0, 1]; masks are [B, H, W] with 1 = subject.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .errors import SubjectImageError

BACKGROUND = 1.0      # white: what product shots and FastComposer-style crops look like
MASK_THRESHOLD = 0.5


def check_images_and_masks(images: torch.Tensor, masks: torch.Tensor | None, label: str = "subject") -> torch.Tensor:
    """Validate and return masks [B, H, W] (all ones when none were given)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SubjectImageError(f"{label}: image must be an IMAGE batch [B, H, W, 3], got shape {list(images.shape)}")
    b, h, w, _ = images.shape
    if masks is None:
        return torch.ones(b, h, w, dtype=images.dtype, device=images.device)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[-2:] != (h, w):
        raise SubjectImageError(
            f"{label}: mask size {masks.shape[-1]}x{masks.shape[-2]} differs from image size {w}x{h}. "
            f"Make the mask from this image (or resize it with an 'Upscale Image'/'Resize Mask' node first)")
    if masks.shape[0] == 1 and b > 1:
        masks = masks.expand(b, h, w)
    if masks.shape[0] != b:
        raise SubjectImageError(
            f"{label}: {b} image(s) but {masks.shape[0]} mask(s). Give one mask per image, or a single mask for all")
    for i in range(b):
        if not bool((masks[i] > MASK_THRESHOLD).any()):
            raise SubjectImageError(
                f"{label}: mask {i + 1} of {b} is empty (no pixel above {MASK_THRESHOLD}). Paint the subject in the "
                f"mask (1 = subject), or leave the mask input unconnected to use the whole image")
    return masks.to(images)


def mask_box(mask: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns of the box around a non-empty mask's pixels above MASK_THRESHOLD."""
    ys, xs = torch.nonzero(mask > MASK_THRESHOLD, as_tuple=True)
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def crop_subject(image: torch.Tensor, mask: torch.Tensor, size: int = 224, margin: float = 0.08) -> torch.Tensor:
    """One image [H, W, 3] + mask [H, W] -> [size, size, 3] subject on a white square."""
    rows, cols = mask_box(mask)
    y0, y1, x0, x1 = rows.start, rows.stop, cols.start, cols.stop
    cut = image * mask[..., None] + BACKGROUND * (1 - mask[..., None])
    cut = cut[y0:y1, x0:x1]
    side = int(max(y1 - y0, x1 - x0) * (1 + 2 * margin)) or 1
    canvas = torch.full((side, side, 3), BACKGROUND, dtype=image.dtype, device=image.device)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    canvas[oy:oy + (y1 - y0), ox:ox + (x1 - x0)] = cut
    out = F.interpolate(canvas.permute(2, 0, 1)[None], size=(size, size), mode="bicubic", align_corners=False,
                        antialias=side > size)
    return out[0].permute(1, 2, 0).clamp(0, 1)


def prepare_subject_batch(images: torch.Tensor, masks: torch.Tensor | None, size: int = 224,
                          label: str = "subject") -> torch.Tensor:
    masks = check_images_and_masks(images, masks, label)
    return torch.stack([crop_subject(images[i], masks[i], size) for i in range(images.shape[0])])
