"""The toy world's identity encoder, in place of CLIP ViT-L/14.

Why not the test suite's random ViT-L/14: it carries identity only in a tiny residual (README.md,
"The world"), so a failure could not tell "the trainer can't learn" from "the encoder is too
weak". An identity here *is* a colour pair and a texture pattern, so the encoder measures
exactly that, invariant to position and size:

- the object's pixels (mask > 0.5) split into two colour clusters (2-means, started from the
  sign of the first principal component), the clusters ordered by a fixed direction: 8 numbers;
- the pattern: how often horizontally / vertically adjacent object pixels share a cluster
  (stripes: 1 one way and 0 the other; checker: 0 both; split: ~1 both), scaled x2: 2 numbers.

`descriptor()` gives those 10 numbers (the space identity similarity is measured in);
`feature()` maps them to the 768-d "image feature" the fusion MLP takes, through a fixed random
orthonormal projection scaled so each entry has about unit variance, like a text embedding.
"""
from __future__ import annotations

import torch

from . import world

DESCRIPTOR_DIM = 10
_ORDER = torch.tensor([0.61, -0.35, 0.52, 0.48])
_PROJECTION: torch.Tensor | None = None


def descriptor(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """[10] identity descriptor of the object under `mask` in `latent` [4, H, W]; None when
    fewer than 4 pixels are inside."""
    inside = mask > 0.5
    px = latent[:, inside].T.float()                                    # [n, 4]
    if px.shape[0] < 4:
        return None
    centred = px - px.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    assign = (centred @ v[0]) > 0
    for _ in range(5):                                                  # 2-means
        if assign.all() or (~assign).all():
            break
        c1, c0 = px[assign].mean(0), px[~assign].mean(0)
        assign = (px - c1).norm(dim=1) < (px - c0).norm(dim=1)
    c1 = px[assign].mean(0) if assign.any() else px.mean(0)
    c0 = px[~assign].mean(0) if (~assign).any() else px.mean(0)
    if float(c1 @ _ORDER) < float(c0 @ _ORDER):
        c0, c1, assign = c1, c0, ~assign
    grid = torch.full(mask.shape, -1, dtype=torch.long)
    grid[inside] = assign.long()
    h_pairs = (grid[:, 1:] >= 0) & (grid[:, :-1] >= 0)
    v_pairs = (grid[1:, :] >= 0) & (grid[:-1, :] >= 0)
    h_same = ((grid[:, 1:] == grid[:, :-1]) & h_pairs).sum() / h_pairs.sum().clamp_min(1)
    v_same = ((grid[1:, :] == grid[:-1, :]) & v_pairs).sum() / v_pairs.sum().clamp_min(1)
    return torch.cat([c0, c1, 2 * torch.stack([h_same, v_same]).float()])


def _projection() -> torch.Tensor:
    global _PROJECTION
    if _PROJECTION is None:
        g = torch.Generator().manual_seed(world.WORLD_SEED + 3)
        q, _ = torch.linalg.qr(torch.randn(world.EMBED_DIM, DESCRIPTOR_DIM, generator=g))
        _PROJECTION = q * (world.EMBED_DIM / DESCRIPTOR_DIM) ** 0.5
    return _PROJECTION


def feature(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[768] the image feature of a reference render (object on an empty background)."""
    d = descriptor(latent, mask)
    if d is None:
        raise ValueError("reference has fewer than 4 object pixels")
    return _projection() @ d
