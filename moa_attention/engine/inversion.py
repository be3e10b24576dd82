"""DDIM inversion in ComfyUI's (k-diffusion) sigma space, pure math.

Deterministic DDIM sampling is the Euler method on x = x0 + sigma * eps (Karras et al. 2022):

    x(s_{i-1}) = x(s_i) + (s_{i-1} - s_i) * eps(x(s_i), s_i),      eps = (x - denoised) / sigma

Inversion walks the same sigmas upwards. The exact inverse of that step needs eps at the point
it is looking for; DDIM inversion takes it at the current point (as diffusers'
DDIMInverseScheduler does), which is exact only as the steps shrink. `refine` fixed-point
iterations solve the implicit step instead (x_i = x_{i-1} + (s_i - s_{i-1}) * eps(x_i, s_i)).
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import MoAInputError

#: denoise(x, sigma) -> the model's estimate of the clean latent
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_sampling_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The sampler's sigmas (descending, usually ending at 0), as the regeneration will use them."""
    s = sigmas.detach().reshape(-1).float()
    if s.numel() < 2:
        raise MoAInputError(f"DDIM inversion needs at least one step (2 sigmas), got {s.numel()} sigma(s)")
    if not bool((s[:-1] > s[1:]).all()):
        raise MoAInputError("DDIM inversion needs strictly descending sigmas, as a sampler gets them "
                            "(e.g. from BasicScheduler); got " + ", ".join(f"{v:.4g}" for v in s.tolist()[:8]))
    if float(s[-1]) < 0:
        raise MoAInputError(f"sigmas must not be negative, got {float(s[-1])}")
    return s


def ddim_invert(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, refine: int = 0,
                callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """x: the latent at sigmas[-1] (the clean photo latent when the schedule ends at 0).
    sigmas: the descending schedule the sampler will regenerate with. Returns the latent at
    sigmas[0], which Euler/DDIM sampling on `sigmas` turns back into (approximately) x."""
    if refine < 0:
        raise MoAInputError(f"refine must be >= 0, got {refine}")
    s = check_sampling_sigmas(sigmas).to(x.device)
    up = s.flip(0)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(up) - 1):
        lo, hi = up[i], up[i + 1]
        at = x
        for _ in range(refine + 1):        # eps at the current point, then at the refined one
            eps = (at - denoise(at, hi * s_in)) / hi
            at = x + (hi - lo) * eps
        x = at
        if callback is not None:
            callback(i, x, hi)
    return x


def renoise_region(inverted: torch.Tensor, region: torch.Tensor, amount: float, sigma: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Fresh noise blended into `region` ([B or 1, h, w] in [0, 1], at the latent's size) of an
    inverted latent at `sigma`: sqrt(1 - a) * inverted + sqrt(a) * fresh with a = amount * region.

    The inverted noise keeps the old subject's colours and shape, which the regeneration follows
    (a swap then redraws the old subject); fresh noise there leaves the subject to the new
    reference while the inverted noise outside keeps the photo's context. Pixels outside the
    region are returned bit for bit. The fresh noise is scaled as KSampler scales a txt2img start
    (sqrt(1 + sigma^2), SD1.5's eps models)."""
    if not 0.0 <= amount <= 1.0:
        raise MoAInputError(f"renoise must be in [0, 1], got {amount} (0 = the inversion as it is, 1 = fresh noise "
                            f"inside the subject's mask)")
    a = (region.to(inverted.device, torch.float32).clamp(0, 1) * amount)[:, None].expand_as(inverted)
    if amount == 0.0 or not bool((a > 0).any()):
        return inverted
    fresh = torch.randn(inverted.shape, generator=generator).to(inverted.device, torch.float32)
    fresh = fresh * (1.0 + float(sigma) ** 2) ** 0.5
    blend = (1 - a).sqrt() * inverted.float() + a.sqrt() * fresh
    return torch.where(a > 0, blend.to(inverted.dtype), inverted)
