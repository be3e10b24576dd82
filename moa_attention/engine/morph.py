"""Subject morphing: one identity interpolated towards another, factor 0..1."""
from __future__ import annotations

import torch

from .errors import MoAInputError


def check_factors(factors) -> tuple[float, ...]:
    out = tuple(float(f) for f in factors)
    if not out:
        raise MoAInputError("a morph needs at least one factor")
    bad = [f for f in out if not 0.0 <= f <= 1.0]      # also NaN
    if bad:
        raise MoAInputError(f"morph factors must be in [0, 1] (0 = subject A, 1 = subject B), got {bad}")
    return out


def sequence_factors(frames: int) -> tuple[float, ...]:
    """`frames` factors evenly from 0 to 1, both ends included."""
    if frames < 2:
        raise MoAInputError(f"a morph sequence needs at least 2 frames (A and B), got {frames}")
    return tuple(i / (frames - 1) for i in range(frames))


def interpolate_features(a: torch.Tensor, b: torch.Tensor, factors) -> torch.Tensor:
    """[K, I]: lerp(a, b, t) per factor. torch.lerp is exact at both ends (t = 0 gives a,
    t = 1 gives b bit for bit), so the sequence starts and ends on the pure subjects."""
    if a.shape != b.shape:
        raise MoAInputError(f"the two subjects' image features differ in shape ({tuple(a.shape)} vs "
                            f"{tuple(b.shape)}): use the same image encoder for both")
    factors = check_factors(factors)
    a, b = a.float(), b.float()
    return torch.stack([torch.lerp(a, b, torch.tensor(t)) for t in factors])


def _per_latent(t: torch.Tensor, batch: int, count: int) -> torch.Tensor:
    """A per-latent tensor (batch entries, or fewer cycled as ComfyUI does) with each latent's
    entry repeated `count` times in a row."""
    picked = t[torch.arange(batch) % t.shape[0]] if t.shape[0] != batch else t
    return picked.repeat_interleave(count, dim=0)


def sequence_latents(latent: dict, count: int) -> dict:
    """A LATENT with every latent of the batch repeated `count` times in a row, each copy keeping
    its latent's batch_index: ComfyUI's samplers give equal batch indices the same noise
    (comfy.sample.prepare_noise), so latent b's pictures b*count .. b*count+count-1 differ only by
    the morph factor, and different latents keep the different noise they would have alone."""
    samples = latent["samples"]
    batch = int(samples.shape[0])
    indices = list(latent.get("batch_index") or range(batch))
    if len(indices) != batch:
        raise MoAInputError(f"the latent's batch_index has {len(indices)} entries for {batch} latents; "
                            f"connect the latent straight from Empty Latent Image or VAE Encode")
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = samples.repeat_interleave(count, dim=0)
    out["batch_index"] = [int(i) for i in indices for _ in range(count)]
    if isinstance(latent.get("noise_mask"), torch.Tensor):
        mask = latent["noise_mask"]
        mask = mask.reshape(-1, *mask.shape[-2:]) if mask.ndim < 4 else mask
        out["noise_mask"] = _per_latent(mask, batch, count)
    return out
