"""Non-finite values (NaN, inf) refused where they enter the pack.

A NaN pixel or latent value is never what the user meant, and it does not stay put: it spreads
through the VAE, the attention and the sampler into a black or noisy picture (or NaN numbers)
far from its cause. One check, used at every node boundary, names the input instead."""
from __future__ import annotations

import torch

from .errors import MoAInputError


def tensors_of(value) -> list[tuple[str, torch.Tensor]]:
    """(suffix, tensor) of a node input: a tensor itself, or the tensors of a LATENT dict
    ('samples', 'noise_mask')."""
    if isinstance(value, torch.Tensor):
        return [("", value)]
    if isinstance(value, dict):
        return [(f"['{k}']", v) for k, v in value.items() if isinstance(v, torch.Tensor)]
    return []


def require_finite(name: str, value) -> None:
    """Raise MoAInputError naming `name` when the tensor (or LATENT) holds NaN or inf values."""
    for suffix, t in tensors_of(value):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            nan = int(torch.isnan(t).sum())
            raise MoAInputError(
                f"{name}{suffix} has {bad} non-finite value(s) ({nan} NaN, {bad - nan} inf) of {t.numel()}. The node "
                f"that made it produced them (e.g. a VAE in fp16 overflowing, or a division by zero); fix that node "
                f"or its settings (e.g. run the VAE in fp32 with --fp32-vae), or give another input")
