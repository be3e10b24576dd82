"""What the MoA layers of one UNet call share, decided once per call by whoever runs the UNet.

The attention layers never see the whole batch, so the caller (the ComfyUI layer's wrapper at
inference, the trainer's step in training) states once per call which rows of the batch are
personalized, their multimodal context, their region masks and the knobs, and hands it to
every layer through transformer_options[STATE_KEY]. Observers (router maps, the trainer's
loss capture) see what each layer decided without the layer knowing who is listening.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import MoAInputError
from .masks import resize_mask

STATE_KEY = "moa_state"


@dataclass
class MoASettings:
    strength: float = 1.0
    sigma_start: float = float("inf")       # personalize while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    hard: bool = False
    # soft routing only: pixels whose personalized share is at most this skip the expert and take
    # the prior's output exactly (0 = dense soft routing, every pixel mixed)
    sparse_threshold: float = 0.0

    def active_at(self, sigma: float) -> bool:
        return self.strength > 0.0 and self.sigma_end <= sigma <= self.sigma_start


def halving_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a UNet level: the latent halved (rounding up, as a stride-2 conv with
    padding 1 does) until it holds n_tokens."""
    h, w = latent_hw
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise MoAInputError(f"MoA cannot place {n_tokens} tokens on a grid derived from latent {latent_hw}")
    return h, w


@dataclass(frozen=True)
class LayerEvent:
    """What one MoA layer decided in one call: its routed share and, on the soft path, the
    personalized query/key (the trainer's object loss derives attention maps from them)."""
    path: str
    kind: str                               # "attn1" or "attn2"
    share: torch.Tensor                     # [R, N, 1] personalized share of the personalized rows
    hw: tuple[int, int]                     # the layer's token grid
    state: "CallState"
    query: torch.Tensor | None = None       # [R, N, inner] personalized query
    key: torch.Tensor | None = None         # [R, L, inner] personalized key
    heads: int = 1


Observer = Callable[[LayerEvent], None]
#: (n_tokens, transformer_options) -> (h, w); the runtime may know a layer's grid better than the halving rule
TokenGrid = Callable[[int, dict], tuple[int, int]]


@dataclass
class CallState:
    rows: torch.Tensor                      # [R] long: rows of the batch that get MoA
    personal_context: torch.Tensor          # [R, L, D]: multimodal context of those rows
    regions: torch.Tensor | None            # [R, 1, H, W] or None
    latent_index: list[int]                 # for each personalized row, its latent in the batch
    settings: MoASettings
    latent_hw: tuple[int, int]
    latent_batch: int = 1
    observers: tuple[Observer, ...] = ()
    token_grid: TokenGrid | None = None
    # per-subject regions: pixels of subject s's region attend, in the personalized cross-attention,
    # to subject_contexts[:, s] (the prompt with only subject s's tokens fused); None = one context
    subject_contexts: torch.Tensor | None = None   # [R, S, L, D]
    subject_regions: torch.Tensor | None = None    # [R, S, H, W], disjoint
    # the UNet timestep of each personalized row: an adapter with a prompt schedule needs it
    timesteps: torch.Tensor | None = None          # [R]
    _region_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def whole_batch(cls, personal_context: torch.Tensor, latent_hw: tuple[int, int],
                    settings: MoASettings | None = None, observers: tuple[Observer, ...] = (),
                    regions: torch.Tensor | None = None, first_row: int = 0,
                    timesteps: torch.Tensor | None = None) -> "CallState":
        """Every latent of a batch personalized, latent i with personal_context[i] ([B, L, D]),
        as the trainer and plain-torch samplers run the UNet: its rows first_row ..
        first_row + B - 1 (first_row = B when the batch is [uncond, cond] for guidance)."""
        b = personal_context.shape[0]
        return cls(rows=torch.arange(first_row, first_row + b, device=personal_context.device),
                   personal_context=personal_context, regions=regions, latent_index=list(range(b)),
                   settings=settings or MoASettings(), latent_hw=(int(latent_hw[0]), int(latent_hw[1])),
                   latent_batch=b, observers=tuple(observers), timesteps=timesteps)

    def grid(self, n_tokens: int, transformer_options: dict) -> tuple[int, int]:
        if self.token_grid is not None:
            return self.token_grid(n_tokens, transformer_options)
        return halving_grid(n_tokens, self.latent_hw)

    def notify(self, event: LayerEvent) -> None:
        for observer in self.observers:
            observer(event)

    def _masks_at(self, name: str, masks: torch.Tensor, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """[R, C, h*w] masks at one layer's resolution (area-averaged when shrinking, so a pixel
        entirely outside a mask stays exactly 0)."""
        key = (name, h, w, like.device)
        if key not in self._region_cache:
            r = resize_mask(masks.to(device=like.device), (h, w), grow="nearest-exact")
            self._region_cache[key] = r.flatten(2).contiguous()
        return self._region_cache[key]

    def region_at(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """[R, h*w, 1] where the personalized rows may be personalized at one layer's resolution."""
        if self.regions is None:
            return None
        return self._masks_at("union", self.regions, h, w, like).transpose(1, 2)

    def subject_weights_at(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """[R, S, h*w, 1] how much each pixel belongs to each subject's region (summing to 1
        inside the regions, 0 outside all of them); None without per-subject regions."""
        if self.subject_regions is None:
            return None
        m = self._masks_at("subjects", self.subject_regions, h, w, like)
        total = m.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, m / total.clamp_min(1e-12), torch.zeros_like(m))
        return weights[..., None]
