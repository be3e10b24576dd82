"""Router-map capture: where, per layer and step, the router sent pixels to the subject.

Maps are accumulated at latent resolution (a running sum and a count per layer), so memory
stays at layers x batch x latent pixels however many steps run. The sums stay on the device
the UNet runs on: copying each layer's map to the CPU would stall a GPU 32 times per step."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .call_state import LayerEvent
from .errors import MoAInputError


class RouterRecorder:
    """An observer of the MoA layers (see call_state.LayerEvent)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}       # layer path -> [B, H, W] float32
        self.counts: dict[str, torch.Tensor] = {}     # layer path -> [B] float32
        self.batch_size = 0
        self.latent_hw: tuple[int, int] | None = None
        self.steps = 0

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.batch_size = 0
        self.latent_hw = None
        self.steps = 0

    def __call__(self, event: LayerEvent) -> None:
        st = event.state
        self.record(event.path, event.share, event.hw, st.latent_index, st.latent_hw, st.latent_batch)

    @torch.no_grad()
    def record(self, path: str, share: torch.Tensor, hw: tuple[int, int], latent_index: list[int],
               latent_hw: tuple[int, int], batch_size: int) -> None:
        """share [R, N, 1] personalized share of the R personalized rows of one layer call."""
        grid = share.detach().float().reshape(share.shape[0], 1, *hw)
        if hw != tuple(latent_hw):
            grid = F.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False)
        grid = grid[:, 0]
        if self.latent_hw != tuple(latent_hw) or batch_size > self.batch_size:
            if self.latent_hw is not None and self.latent_hw != tuple(latent_hw):
                self.reset()
            self.latent_hw = tuple(latent_hw)
            self.batch_size = max(batch_size, self.batch_size)
        if path not in self.sums or self.sums[path].shape[0] < self.batch_size:
            old_s, old_c = self.sums.get(path), self.counts.get(path)
            self.sums[path] = torch.zeros(self.batch_size, *latent_hw, device=grid.device)
            self.counts[path] = torch.zeros(self.batch_size, device=grid.device)
            if old_s is not None:
                self.sums[path][: old_s.shape[0]] = old_s
                self.counts[path][: old_c.shape[0]] = old_c
        for i, li in enumerate(latent_index):
            self.sums[path][li] += grid[i]
            self.counts[path][li] += 1

    @property
    def layers(self) -> list[str]:
        return list(self.sums)

    def average(self, layers: list[str] | None = None) -> torch.Tensor:
        """[B, H, W] mean personalized share over the given layers (default all) and all steps;
        latents that never had a personalized row are 0."""
        layers = layers if layers is not None else self.layers
        if not layers or self.latent_hw is None:
            raise MoAInputError("no router maps were recorded: run a sampler on the MoA model first "
                              "(and check that its positive prompt comes from MoA Apply)")
        missing = [p for p in layers if p not in self.sums]
        if missing:
            raise MoAInputError(f"no router map for layer(s) {missing}; recorded: {self.layers}")
        total = sum(self.sums[p].cpu() for p in layers)
        count = sum(self.counts[p].cpu() for p in layers)
        return total / count.clamp_min(1)[:, None, None]
