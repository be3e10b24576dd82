"""Run adapter weights against activations of any dtype/device without moving the module.

ComfyUI may run the UNet in fp16/bf16 on a GPU while an adapter stays fp32 on the CPU (or
the other way round); its own `manual_cast` ops cast weights at call time for the same
reason. This keeps the engine pure torch while behaving like those ops."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def cast_param(p: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if p is None:
        return None
    if p.dtype == like.dtype and p.device == like.device:
        return p
    return p.to(device=like.device, dtype=like.dtype, non_blocking=True)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, cast_param(layer.weight, x), cast_param(layer.bias, x))
