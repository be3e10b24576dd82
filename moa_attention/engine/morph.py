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
