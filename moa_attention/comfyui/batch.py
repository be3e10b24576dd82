"""Which rows of a ComfyUI batch MoA personalizes, decided once per UNet call.

ComfyUI batches cond and uncond rows together (transformer_options["cond_or_uncond"] says which
is which), repeats a shorter prompt up to the longest one when it batches conds of different
token lengths, and reports the step's sigma. None of that reaches the engine: this module turns
it into the engine's CallState.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..engine.call_state import CallState, MoASettings, Observer, halving_grid


@dataclass
class SubjectBinding:
    """One prompt that MoA fused: the plain text-encoder output the sampler will see, and the
    same prompt with the subjects' tokens replaced by fused embeddings."""
    plain: torch.Tensor                     # [L, D]
    fused: torch.Tensor                     # [L, D]
    region: torch.Tensor | None = None      # [H, W] in [0, 1], image or latent space; None = anywhere
    _cast: dict = field(default_factory=dict, repr=False)

    def cast(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = (self.plain.to(device=like.device, dtype=like.dtype),
                               self.fused.to(device=like.device, dtype=like.dtype))
        return self._cast[key]

    def matches(self, row: torch.Tensor) -> bool:
        """row [L', D] is this prompt, possibly repeated: ComfyUI repeats shorter prompts up to
        the batch's longest when it batches conds of different lengths."""
        plain, _ = self.cast(row)
        n = plain.shape[0]
        if row.shape[-1] != plain.shape[-1] or row.shape[0] % n:
            return False
        return all(torch.equal(row[i:i + n], plain) for i in range(0, row.shape[0], n))

    def fused_like(self, row: torch.Tensor) -> torch.Tensor:
        _, fused = self.cast(row)
        return fused.repeat(row.shape[0] // fused.shape[0], 1)


def comfy_token_grid(latent_hw: tuple[int, int]):
    """ComfyUI 0.3.x tells each attention layer its activation shape; trust it (a pack that
    rescales inside the UNet, like Kohya Deep Shrink, breaks the halving rule), else halve."""
    def grid(n_tokens: int, transformer_options: dict) -> tuple[int, int]:
        shape = transformer_options.get("activations_shape")
        if shape is not None and len(shape) == 4 and shape[2] * shape[3] == n_tokens:
            return int(shape[2]), int(shape[3])
        return halving_grid(n_tokens, latent_hw)
    return grid


def _latent_regions(regions: list[torch.Tensor | None], latent_hw: tuple[int, int], device) -> torch.Tensor | None:
    if all(reg is None for reg in regions):
        return None
    h, w = latent_hw
    masks = []
    for reg in regions:
        if reg is None:
            masks.append(torch.ones(1, 1, h, w))
        else:
            m = reg.float()[None, None]
            masks.append(F.interpolate(m, size=(h, w), mode="area") if m.shape[-2:] != (h, w) else m)
    return torch.cat(masks).to(device)


def build_call_state(context: torch.Tensor, transformer_options: dict, bindings: list[SubjectBinding],
                     settings: MoASettings, observers: tuple[Observer, ...],
                     latent_hw: tuple[int, int]) -> CallState | None:
    """None when no row of this call is personalized (then every layer runs the prior only)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is not None and not settings.active_at(float(sigmas.reshape(-1)[0])):
        return None
    if settings.strength <= 0.0 or context is None:
        return None
    batch = context.shape[0]
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    chunk = max(batch // len(cond_or_uncond), 1)
    rows, contexts, regions, latent_index = [], [], [], []
    for r in range(batch):
        group = min(r // chunk, len(cond_or_uncond) - 1)
        if cond_or_uncond[group] != 0:      # negative/uncond rows stay exactly the prior
            continue
        for b in bindings:
            if b.matches(context[r]):
                rows.append(r)
                contexts.append(b.fused_like(context[r]))
                regions.append(b.region)
                latent_index.append(r % chunk)
                break
    if not rows:
        return None
    return CallState(rows=torch.tensor(rows, dtype=torch.long, device=context.device),
                     personal_context=torch.stack(contexts),
                     regions=_latent_regions(regions, latent_hw, context.device),
                     latent_index=latent_index, settings=settings, latent_hw=latent_hw, latent_batch=chunk,
                     observers=observers, token_grid=comfy_token_grid(latent_hw))
