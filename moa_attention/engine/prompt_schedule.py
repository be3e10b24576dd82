"""The multimodal prompt conditioned on the diffusion timestep and the UNet layer.

The MoA paper conditions its multimodal prompt on the timestep and the layer: what a subject
pixel needs from the identity at high noise (the subject's overall look) is not what it needs
once the picture shows through the noise (which pixel takes which part), nor the same at a
64x64 layer as at an 8x8 one. With a schedule, each layer's personalized cross-attention sees
the fused tokens' change to the prompt scaled channel by channel by a gain of (t, layer):

    prompt(t, layer) = plain + (fused - plain) * (1 + gain(t, layer))

The fusion decides what goes into which channel, the schedule which channels each layer and
noise level reads. Its last projection starts at zero, so a fresh schedule gives the
unconditioned prompt exactly, and a schedule never touches a token the fusion left alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .casting import linear

#: sinusoidal frequencies of the timestep embedding (as the UNet's own timestep embedding)
FREQUENCIES = 32
#: width of the (timestep, layer) embedding
WIDTH = 128


def timestep_embedding(timesteps: torch.Tensor, frequencies: int = FREQUENCIES) -> torch.Tensor:
    """[R] UNet timesteps (0..999) -> [R, 2 * frequencies] cos/sin features."""
    scales = torch.exp(-math.log(10000.0) * torch.arange(frequencies, device=timesteps.device) / frequencies)
    angles = timesteps.float()[:, None] * scales[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class PromptSchedule(nn.Module):
    """gain(t, layer) = out(gelu(time(embed(t)) + layer_embedding[layer])), one [text_dim] gain per row."""

    def __init__(self, layers: int, text_dim: int, width: int = WIDTH, frequencies: int = FREQUENCIES) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a prompt schedule needs at least one layer, got {layers}")
        self.frequencies = frequencies
        self.time = nn.Linear(2 * frequencies, width)
        self.layer = nn.Embedding(layers, width)
        self.out = nn.Linear(width, text_dim)

    @torch.no_grad()
    def reset_fresh(self, generator: torch.Generator | None = None) -> None:
        self.time.weight.normal_(0.0, self.time.in_features ** -0.5, generator=generator)
        self.time.bias.zero_()
        self.layer.weight.normal_(0.0, 1.0, generator=generator)
        self.out.weight.zero_()
        self.out.bias.zero_()

    def gain(self, timesteps: torch.Tensor, layer: int) -> torch.Tensor:
        """[R] timesteps -> [R, 1, text_dim] gains (0 for a fresh schedule)."""
        t = linear(timestep_embedding(timesteps, self.frequencies), self.time)
        h = F.gelu(t + self.layer.weight[layer].to(t))
        return linear(h, self.out)[:, None]

    def apply(self, personal: torch.Tensor, plain: torch.Tensor, timesteps: torch.Tensor, layer: int) -> torch.Tensor:
        """personal [R, L', D] (the fused prompts, L' >= L: further identity tokens come after the
        prompt and are not scheduled), plain [R, L, D] -> the prompts this layer sees at these
        timesteps."""
        return self.apply_each([personal], plain, timesteps, layer)[0]

    def apply_each(self, personals: list[torch.Tensor], plain: torch.Tensor, timesteps: torch.Tensor,
                   layer: int) -> list[torch.Tensor]:
        """apply() to several fused prompts of the same rows (one per subject region), with the
        gain of (t, layer) computed once."""
        length = plain.shape[1]
        gain = self.gain(timesteps, layer)
        out = []
        for personal in personals:
            scheduled = plain + (personal[:, :length] - plain) * (1.0 + gain.to(personal.dtype))
            extra = personal[:, length:]
            out.append(scheduled if extra.shape[1] == 0 else torch.cat([scheduled, extra], dim=1))
        return out
