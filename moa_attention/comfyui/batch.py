"""Which rows of a ComfyUI batch MoA personalizes, decided once per UNet call.

ComfyUI batches cond and uncond rows together (transformer_options["cond_or_uncond"] says which
is which), repeats a shorter prompt up to the longest one when it batches conds of different
token lengths, and reports the step's sigma. None of that reaches the engine: this module turns
it into the engine's CallState.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.call_state import CallState, MoASettings, Observer, halving_grid
from ..engine.fusion import stack_prompts
from ..engine.masks import resize_mask


@dataclass
class SubjectBinding:
    """One prompt that MoA fused: the plain text-encoder output the sampler will see, and the
    same prompt with the subjects' tokens replaced by fused embeddings (and, for an adapter with
    several identity tokens per subject, the further tokens after it: [L + E, D]).

    `fused` may hold one prompt per latent of the batch ([K, L, D], a morph sequence: latent i
    gets fused[i % K]). With per-subject regions, `subject_fused` [S, L, D] (or [K, S, L, D])
    holds one prompt per subject with only that subject's tokens fused, and `subject_regions`
    [S, H, W] where each subject may appear; `region` is then their union. `latent_batch`: how
    many latents the morph made for the sampler (None without a morph)."""
    plain: torch.Tensor                     # [L, D]
    fused: torch.Tensor                     # [L + E, D] or [K, L + E, D]
    region: torch.Tensor | None = None      # [H, W] in [0, 1], image or latent space; None = anywhere
    subject_fused: torch.Tensor | None = None
    subject_regions: torch.Tensor | None = None
    latent_batch: int | None = None
    _cast: dict = field(default_factory=dict, repr=False)

    def _cast_to(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    def cast(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cast_to("plain", like), self._cast_to("fused", like)

    def matches(self, row: torch.Tensor) -> bool:
        """row [L', D] is this prompt, possibly repeated: ComfyUI repeats shorter prompts up to
        the batch's longest when it batches conds of different lengths."""
        plain = self._cast_to("plain", row)
        n = plain.shape[0]
        if row.shape[-1] != plain.shape[-1] or row.shape[0] % n:
            return False
        return all(torch.equal(row[i:i + n], plain) for i in range(0, row.shape[0], n))

    @property
    def sequence_length(self) -> int:
        """K: how many fused prompts (one per latent of a morph sequence); 1 normally."""
        return self.fused.shape[0] if self.fused.ndim == 3 else 1

    def _for_latent(self, t: torch.Tensor, base_ndim: int, latent_index: int) -> torch.Tensor:
        return t[latent_index % t.shape[0]] if t.ndim > base_ndim else t

    def _repeated_like(self, fused: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """fused [..., L + E, D] with its prompt part repeated as ComfyUI repeated `row`; the E
        extra identity tokens (fusion.py) follow once."""
        n = self.plain.shape[0]
        times = row.shape[0] // n
        if times == 1:
            return fused
        prompt, extra = fused[..., :n, :], fused[..., n:, :]
        return torch.cat([prompt.repeat(*([1] * (fused.ndim - 2)), times, 1), extra], dim=-2)

    def fused_like(self, row: torch.Tensor, latent_index: int = 0) -> torch.Tensor:
        return self._repeated_like(self._for_latent(self._cast_to("fused", row), 2, latent_index), row)

    def subject_fused_like(self, row: torch.Tensor, latent_index: int = 0) -> torch.Tensor | None:
        """[S, L', D] one prompt per subject, repeated like `row`."""
        if self.subject_fused is None:
            return None
        return self._repeated_like(self._for_latent(self._cast_to("subject_fused", row), 3, latent_index), row)


def comfy_token_grid(latent_hw: tuple[int, int]):
    """ComfyUI 0.3.x tells each attention layer its activation shape; trust it (a pack that
    rescales inside the UNet, like Kohya Deep Shrink, breaks the halving rule), else halve."""
    def grid(n_tokens: int, transformer_options: dict) -> tuple[int, int]:
        shape = transformer_options.get("activations_shape")
        if shape is not None and len(shape) == 4 and shape[2] * shape[3] == n_tokens:
            return int(shape[2]), int(shape[3])
        return halving_grid(n_tokens, latent_hw)
    return grid


def _to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] -> [C, h, w] at latent size (area-averaged: a pixel outside stays exactly 0)."""
    return resize_mask(mask.reshape(-1, *mask.shape[-2:]), latent_hw, grow="nearest-exact")


def _latent_regions(regions: list[torch.Tensor | None], latent_hw: tuple[int, int], device) -> torch.Tensor | None:
    if all(reg is None for reg in regions):
        return None
    masks = [torch.ones(1, *latent_hw) if reg is None else _to_latent(reg, latent_hw) for reg in regions]
    return torch.stack(masks).to(device)


def build_call_state(context: torch.Tensor, transformer_options: dict, bindings: list[SubjectBinding],
                     settings: MoASettings, observers: tuple[Observer, ...],
                     latent_hw: tuple[int, int], timesteps: torch.Tensor | None = None) -> CallState | None:
    """None when no row of this call is personalized (then every layer runs the prior only).
    `timesteps` [B]: the UNet's timestep per row (an adapter with a prompt schedule reads it)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is not None and not settings.active_at(float(sigmas.reshape(-1)[0])):
        return None
    if settings.strength <= 0.0 or context is None:
        return None
    batch = context.shape[0]
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    chunk = max(batch // len(cond_or_uncond), 1)
    rows, contexts, regions, latent_index, matched = [], [], [], [], []
    for r in range(batch):
        group = min(r // chunk, len(cond_or_uncond) - 1)
        if cond_or_uncond[group] != 0:      # negative/uncond rows stay exactly the prior
            continue
        for b in bindings:
            if b.matches(context[r]):
                rows.append(r)
                contexts.append(b.fused_like(context[r], r % chunk))
                regions.append(b.region)
                latent_index.append(r % chunk)
                matched.append(b)
                break
    if not rows:
        return None
    subject_contexts = subject_regions = None
    if all(b.subject_fused is not None for b in matched):
        subject_contexts = torch.stack([b.subject_fused_like(context[r], li)
                                        for b, r, li in zip(matched, rows, latent_index)])
        subject_regions = torch.stack([_to_latent(b.subject_regions, latent_hw) for b in matched]).to(context.device)
        union = subject_regions.sum(dim=1, keepdim=True).clamp(0, 1)
    else:
        union = _latent_regions(regions, latent_hw, context.device)
    index = torch.tensor(rows, dtype=torch.long, device=context.device)
    return CallState(rows=index,
                     personal_context=stack_prompts(contexts, context.shape[1]), regions=union,
                     latent_index=latent_index, settings=settings, latent_hw=latent_hw, latent_batch=chunk,
                     observers=observers, token_grid=comfy_token_grid(latent_hw),
                     subject_contexts=subject_contexts, subject_regions=subject_regions,
                     timesteps=None if timesteps is None else timesteps.to(context.device)[index])
