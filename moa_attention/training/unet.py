"""The caller's UNet, borrowed for training and given back as it came.

Training freezes the UNet, puts it in eval mode on the training device and may wrap its
transformer blocks for gradient checkpointing; the MoA layers go in with
engine.layer.moa_layers. Each change is a context manager, so every way out of training (the
last step, Ctrl-C, a NaN loss, an out-of-memory error) undoes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def borrowed_unet(diffusion_model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The UNet frozen (ComfyUI leaves requires_grad on: the prior must stay frozen), in eval mode
    and on `device`; its requires_grad flags, train/eval modes and device are restored afterwards."""
    flags = [p.requires_grad for p in diffusion_model.parameters()]
    modes = [m.training for m in diffusion_model.modules()]
    home = next(diffusion_model.parameters()).device
    diffusion_model.to(device).requires_grad_(False).eval()
    try:
        yield diffusion_model
    finally:
        for p, flag in zip(diffusion_model.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in zip(diffusion_model.modules(), modes):
            m.training = mode
        diffusion_model.to(home)


@contextmanager
def checkpointed_blocks(diffusion_model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gradient checkpointing of every transformer block (recomputed in backward: less memory,
    slower) while the block runs; the blocks' own forward afterwards."""
    from torch.utils.checkpoint import checkpoint
    wrapped = []
    for module in diffusion_model.modules() if enabled else ():
        if hasattr(module, "attn1") and hasattr(module, "ff"):        # BasicTransformerBlock
            wrapped.append((module, module.__dict__.get("forward")))
            original = module.forward

            def forward(*args, _f=original, **kwargs):
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            module.forward = forward
    try:
        yield
    finally:
        for module, own in wrapped:
            if own is None:
                del module.forward          # the class's forward again
            else:
                module.forward = own
