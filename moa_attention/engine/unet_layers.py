"""Which attention layers of a UNet MoA owns, found by walking the model.

Walking (instead of a fixed SD1.5 table) keeps the tiny test UNets and the full SD1.5 UNet
on one code path. The walk stops at attention modules: while a MoA patch is installed the
swapped module holds the original projections, and descending into it would list them twice.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTENTION_NAMES = ("attn1", "attn2")


@dataclass(frozen=True)
class LayerSpec:
    path: str          # attribute path inside the diffusion model, e.g. "middle_block.1.transformer_blocks.0.attn1"
    kind: str          # "attn1" (self-attention) or "attn2" (cross-attention)
    query_dim: int
    context_dim: int
    inner_dim: int
    heads: int

    def as_list(self) -> list:
        return [self.path, self.kind, self.query_dim, self.context_dim, self.inner_dim, self.heads]

    @classmethod
    def from_list(cls, row: list) -> "LayerSpec":
        path, kind, q, c, i, h = row
        return cls(str(path), str(kind), int(q), int(c), int(i), int(h))


def is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def spec_of(path: str, module: nn.Module) -> LayerSpec:
    kind = path.rsplit(".", 1)[-1]
    to_q, to_k = module.to_q, module.to_k
    return LayerSpec(path=path, kind=kind, query_dim=to_q.in_features, context_dim=to_k.in_features,
                     inner_dim=to_q.out_features, heads=int(module.heads))


def find_attention_layers(diffusion_model: nn.Module) -> list[LayerSpec]:
    """Every attn1/attn2 of every transformer block, in module order."""
    specs: list[LayerSpec] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if name in ATTENTION_NAMES and is_attention(child):
                specs.append(spec_of(path, child))
                continue
            walk(path, child)

    walk("", diffusion_model)
    return specs


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
