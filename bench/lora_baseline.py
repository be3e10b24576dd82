"""The baseline of the training bench: a plain LoRA on exactly the attention projections MoA's
expert covers (to_q, to_k, to_v, to_out of every attn1/attn2 the adapter finds), the same rank,
trained with the plain denoising loss. A minimal wrapper, not a LoRA library: what matters for
the bench is that it does the work a LoRA fine-tuning step does on those layers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class LoRALinear(nn.Module):
    """base(x) + up(down(x)): the frozen Linear and a trainable rank-r delta. `up` starts at zero
    (as MoA's low-rank expert does), so a fresh LoRA is the base layer bit for bit."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)          # not registered: only the delta trains
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.down.weight, 0.0, base.in_features ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def _linear_slot(attention: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent, attribute) of a projection's Linear; to_out is Sequential(Linear, Dropout) in ComfyUI."""
    module = getattr(attention, name)
    if isinstance(module, nn.Sequential):
        return module, "0"
    return attention, name


class LoRA(nn.Module):
    """One LoRALinear per projection of each attention layer at `paths` in `diffusion_model`;
    `installed()` puts them in for a `with` block and the original Linears back afterwards."""

    def __init__(self, diffusion_model: nn.Module, paths: list[str], rank: int) -> None:
        super().__init__()
        if not paths:
            raise ValueError("LoRA: no attention layer paths given; pass the layers MoA's adapter covers")
        object.__setattr__(self, "diffusion_model", diffusion_model)
        self.slots: list[tuple[nn.Module, str]] = []
        self.deltas = nn.ModuleList()
        for path in paths:
            attention = diffusion_model.get_submodule(path)
            for name in PROJECTIONS:
                parent, attr = _linear_slot(attention, name)
                base = parent._modules[attr]
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"LoRA: {path}.{name} is a {type(base).__name__}, not a Linear")
                self.slots.append((parent, attr))
                self.deltas.append(LoRALinear(base, min(rank, base.in_features, base.out_features)))

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = [parent._modules[attr] for parent, attr in self.slots]
        for (parent, attr), delta in zip(self.slots, self.deltas):
            parent._modules[attr] = delta
        try:
            yield
        finally:
            for (parent, attr), original in zip(self.slots, originals):
                parent._modules[attr] = original
