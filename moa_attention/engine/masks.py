"""Masks and router shares moved between grids: the picture, the latent and a layer's tokens.

One rule everywhere: shrinking averages areas, so a pixel wholly outside a mask stays exactly 0
(a region's outside must stay the prior's bit for bit, and a metric's background must not borrow
subject pixels); growing interpolates bilinearly, or with hard edges where the caller asks."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def resize_mask(mask: torch.Tensor, hw: tuple[int, int], grow: str = "bilinear") -> torch.Tensor:
    """[..., H, W] -> [..., h, w] float32: area-averaged when shrinking, `grow` ("bilinear" or
    "nearest-exact") when growing; the same values when the size already fits."""
    hw = (int(hw[0]), int(hw[1]))
    if tuple(mask.shape[-2:]) == hw:
        return mask.float()
    lead = mask.shape[:-2]
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    mode = "area" if m.shape[-2] >= hw[0] and m.shape[-1] >= hw[1] else grow
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(m, size=hw, mode=mode, **extra).reshape(*lead, *hw)


def share_on_latent(share: torch.Tensor, hw: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """[R, N, 1] a layer's personalized share on its token grid `hw` -> [R, h, w] at the latent's
    size, detached, in fp32: how router maps and the trainer's metrics average layers."""
    return resize_mask(share.detach().float().reshape(share.shape[0], *hw), latent_hw)
