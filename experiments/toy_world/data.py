"""Toy-world scenes as the trainer's pre-encoded Examples (latent, text, features, masks)."""
from __future__ import annotations

import torch

from comfyui_moa.moa_attention.training.encode import Example

from . import encoder, world


def reference(identity: world.Identity, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference photo of the identity with its background removed: another render (own place
    and size), so the adapter cannot copy the layout from it. (latent, mask)."""
    s = world.render(identity, None, g)
    return s.latent, s.mask


def example(scene: world.Scene, feature: torch.Tensor) -> Example:
    return Example(latent=scene.latent, text=world.embed(scene.tokens), positions=[[world.CLASS_POSITION]],
                   features=[feature], masks=scene.mask[None].clone(), caption=" ".join(scene.tokens))


def make_examples(identities: list[world.Identity], scenes_per_identity: int, seed: int) -> list[Example]:
    """Per identity one reference feature and `scenes_per_identity` scenes on random backgrounds."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ident in identities:
        feat = encoder.feature(*reference(ident, g))
        out += [example(world.random_scene(g, ident), feat) for _ in range(scenes_per_identity)]
    return out
