"""Router-map capture: where, per layer and step, the router sent pixels to the subject, and
the colours a map is drawn in.

Maps are accumulated at latent resolution (a running sum and a count per layer), so memory
stays at layers x batch x latent pixels however many steps run. The sums stay on the device
the UNet runs on: copying each layer's map to the CPU would stall a GPU 32 times per step."""
from __future__ import annotations

import torch

from .call_state import LayerEvent
from .errors import MoAInputError
from .masks import share_on_latent


class RouterRecorder:
    """An observer of the MoA layers (see call_state.LayerEvent)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}       # layer path -> [B, H, W] float32
        self.counts: dict[str, torch.Tensor] = {}     # layer path -> [B] float32
        self.batch_size = 0
        self.latent_hw: tuple[int, int] | None = None
        self.steps = 0
        self.subject_weights: torch.Tensor | None = None   # [B, S, H, W] with per-subject regions
        self._last_state: int | None = None

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.batch_size = 0
        self.latent_hw = None
        self.steps = 0
        self.subject_weights = None
        self._last_state = None

    def __call__(self, event: LayerEvent) -> None:
        st = event.state
        self.record(event.path, event.share, event.hw, st.latent_index, st.latent_hw, st.latent_batch)
        if st.subject_regions is not None and self._last_state != id(st):
            self._last_state = id(st)
            self.record_subjects(st)

    @torch.no_grad()
    def record_subjects(self, st) -> None:
        """Which latent pixels belong to which subject's region (the same at every step)."""
        h, w = st.latent_hw
        weights = st.subject_weights_at(h, w, like=st.subject_regions)[..., 0].float().cpu()   # [R, S, h*w]
        weights = weights.reshape(*weights.shape[:2], h, w)
        size = (self.batch_size, weights.shape[1], h, w)
        if self.subject_weights is None or self.subject_weights.shape != size:
            old, self.subject_weights = self.subject_weights, torch.zeros(size)
            if old is not None and old.shape[1:] == size[1:]:
                self.subject_weights[: old.shape[0]] = old
        for i, li in enumerate(st.latent_index):
            self.subject_weights[li] = weights[i]

    def subject_average(self, subject: int, layers: list[str] | None = None) -> torch.Tensor:
        """[B, H, W] the share that went to subject `subject` (0-based): the average share times
        that subject's region weight, so it is exactly 0 outside the subject's region."""
        if self.subject_weights is None:
            raise MoAInputError("the subjects had no regions, so there is no map per subject: choose subject 0 "
                                "(all subjects), or give every subject a region")
        count = self.subject_weights.shape[1]
        if not 0 <= subject < count:
            raise MoAInputError(f"subject {subject + 1} does not exist: the prompt has {count} subject(s)")
        avg = self.average(layers)
        return avg * self.subject_weights[: avg.shape[0], subject]

    @torch.no_grad()
    def record(self, path: str, share: torch.Tensor, hw: tuple[int, int], latent_index: list[int],
               latent_hw: tuple[int, int], batch_size: int) -> None:
        """share [R, N, 1] personalized share of the R personalized rows of one layer call."""
        grid = share_on_latent(share, hw, latent_hw)
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


def heat_colors(share: torch.Tensor) -> torch.Tensor:
    """[B, H, W] share in [0, 1] -> [B, H, W, 3] colours: blue (prior) through red (personalized),
    how MoA Router Maps and MoA Evaluate draw a router map."""
    s = share.clamp(0, 1)[..., None]
    blue = torch.tensor([0.10, 0.25, 0.95], device=s.device)
    red = torch.tensor([0.95, 0.20, 0.10], device=s.device)
    return (1 - s) * blue + s * red
