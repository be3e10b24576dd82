"""What the MoA layers of one UNet call need to know, decided once per call.

The attention layers never see the whole batch's conditioning, so a wrapper around the
diffusion model works out, once per call, which rows of the batch carry a prompt that MoA
fused (their personalized expert is on), the multimodal context of those rows, their region
masks, and whether the current sigma lies inside the start/end window. Layers read it from
transformer_options[STATE_KEY].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .router_maps import RouterRecorder

STATE_KEY = "moa_state"


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


@dataclass
class MoASettings:
    strength: float = 1.0
    sigma_start: float = float("inf")       # personalize while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    hard: bool = False

    def active_at(self, sigma: float) -> bool:
        return self.strength > 0.0 and self.sigma_end <= sigma <= self.sigma_start


@dataclass
class CallState:
    rows: torch.Tensor                      # [R] long: rows of the batch that get MoA
    personal_context: torch.Tensor          # [R, L, D]: multimodal context of those rows
    regions: torch.Tensor | None            # [R, 1, H, W] or None
    latent_index: list[int]                 # for each personalized row, its latent in the batch
    settings: MoASettings
    recorder: RouterRecorder | None
    latent_hw: tuple[int, int]
    latent_batch: int = 1
    #: training only: layers append (path, share, subject attention maps or None) here
    capture: list | None = None
    #: training only: per personalized row, the token positions of each subject
    subject_tokens: list[list[list[int]]] | None = None
    _region_cache: dict = field(default_factory=dict, repr=False)

    def region_at(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """[R, h*w, 1] region masks at one layer's resolution (area-averaged when shrinking,
        so a pixel entirely outside every region stays exactly 0)."""
        if self.regions is None:
            return None
        key = (h, w, like.device)
        if key not in self._region_cache:
            r = self.regions.to(device=like.device, dtype=torch.float32)
            if r.shape[-2:] != (h, w):
                mode = "area" if r.shape[-2] >= h and r.shape[-1] >= w else "nearest-exact"
                r = F.interpolate(r, size=(h, w), mode=mode)
            self._region_cache[key] = r.flatten(2).transpose(1, 2).contiguous()
        return self._region_cache[key]


def layer_hw(n_tokens: int, transformer_options: dict, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The spatial size of a layer's token grid."""
    shape = transformer_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == n_tokens:
        return int(shape[2]), int(shape[3])
    h, w = latent_hw
    while h * w > n_tokens:                 # ComfyUI's stride-2 downsampling rounds up
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise RuntimeError(f"MoA cannot place {n_tokens} tokens on a grid derived from latent {latent_hw}")
    return h, w


def build_call_state(context: torch.Tensor, transformer_options: dict, bindings: list[SubjectBinding],
                     settings: MoASettings, recorder: RouterRecorder | None,
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
    region_tensor = None
    if any(reg is not None for reg in regions):
        h, w = latent_hw
        masks = []
        for reg in regions:
            if reg is None:
                masks.append(torch.ones(1, 1, h, w))
            else:
                m = reg.float()[None, None]
                masks.append(F.interpolate(m, size=(h, w), mode="area") if m.shape[-2:] != (h, w) else m)
        region_tensor = torch.cat(masks).to(context.device)
    return CallState(rows=torch.tensor(rows, dtype=torch.long, device=context.device),
                     personal_context=torch.stack(contexts), regions=region_tensor,
                     latent_index=latent_index, settings=settings, recorder=recorder, latent_hw=latent_hw,
                     latent_batch=chunk)
