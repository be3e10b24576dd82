"""Subjects shown in another example's colours in the noisy input (ours, experimental).

Trained only on noisy pictures of the right subject, the expert learns to keep whatever
colours the noisy input already shows once they are visible. When sampling, those colours were
drawn by the steps before, mostly by the prior; when swapping, they are the old subject's. With
the subject recoloured in the input and the target left the true picture, the reference is the
only source of the subject's colours the expert can rely on."""
from __future__ import annotations

import torch


def _channel_stats(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example, per-channel weighted mean and std: x [B, C, H, W], weight [B, 1, H, W]."""
    total = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    mean = (x * weight).sum(dim=(2, 3), keepdim=True) / total
    var = (((x - mean) ** 2) * weight).sum(dim=(2, 3), keepdim=True) / total
    return mean, var.clamp_min(1e-6).sqrt()


def recolour_subjects(x0: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x0 [B, C, H, W] with every example's subject pixels given the per-channel mean and spread
    of the next example's subject (the batch rolled by one), blended by the subject masks
    [B, S, H, W]. The subject's layout and pattern stay; a batch of one is returned unchanged."""
    if x0.shape[0] < 2:
        return x0
    union = masks.amax(dim=1, keepdim=True).to(x0.dtype)
    mean, std = _channel_stats(x0, union)
    other_mean, other_std = mean.roll(1, dims=0), std.roll(1, dims=0)
    recoloured = (x0 - mean) / std * other_std + other_mean
    present = union.sum(dim=(1, 2, 3), keepdim=True) > 0
    has_subject = present & present.roll(1, dims=0)
    return torch.where(has_subject, x0 + union * (recoloured - x0), x0)


def corrected_target(noise: torch.Tensor, x_in: torch.Tensor, x0: torch.Tensor,
                     alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The epsilon that leads from x_t = sqrt(abar) x_in + sqrt(1 - abar) noise back to the true
    x0 (abar [B, 1, 1, 1]): noise + sqrt(abar / (1 - abar)) (x_in - x0); `noise` where x_in == x0."""
    return noise + (alphas_cumprod / (1 - alphas_cumprod)).sqrt() * (x_in - x0)
