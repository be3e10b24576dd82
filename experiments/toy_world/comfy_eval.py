"""The toy world judged through the pack's ComfyUI path, as a user runs it.

The base is a ComfyUI ModelPatcher, MoA goes on with `apply_moa` and one subject binding per
picture, pictures come from `comfy.sample.sample` with a stock sampler and scheduler, and the
swap inverts the photo with the pack's DDIM inversion on the base before regenerating it with
MoA and the new subject confined to the old subject's region (the subject-swap workflow).

Identity is judged by retrieval: the descriptor of the object drawn is compared with the
references of every evaluation identity of its class; rank 1 means the right identity is the
nearest (chance 1 / references per class). Beside it the centred cosine to the own reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
from comfyui_moa.moa_attention.comfyui.patch import apply_moa, get_controller
from comfyui_moa.moa_attention.comfyui.sampling import sample_latents, unit_scale_patcher
from comfyui_moa.moa_attention.comfyui.subjects import fused_context
from comfyui_moa.moa_attention.scoring.metrics import change_inside_outside, cosine

from . import encoder, world

#: an object covers 4..80 pixels (radius 2.5..4); more means the background itself is off
MAX_OBJECT_PIXELS = 80


@dataclass
class SampleSpec:
    """How the pictures are sampled: KSampler's settings for txt2img, MoA Invert Photo's and
    KSamplerAdvanced's (add_noise disabled) for the swap."""
    steps: int = 20
    cfg: float = 3.0
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    swap_steps: int = 20
    invert_cfg: float = 1.0          # MoA Invert Photo's cfg
    swap_cfg: float = 1.0            # KSamplerAdvanced's cfg regenerating from the inverted noise
    swap_sampler: str = "euler"
    swap_scheduler: str = "normal"
    swap_refine: int = 3
    strength: float = 1.0            # MoA Apply's strength, txt2img and swap
    start_percent: float = 0.0       # MoA Apply's start_percent: the base alone before it
    swap_renoise: float = 0.0        # MoA Invert Photo's renoise inside the old subject's region
    sparse_threshold: float = 0.0    # MoA Apply's sparse_threshold (0 = dense soft routing)


def comfy_model(model):
    """The toy base as the MODEL a checkpoint loader would give (its latents are unit-scale)."""
    return unit_scale_patcher(model, "cpu")


def distinct_caption_groups(captions: list[str]) -> list[list[int]]:
    """Batches in which no caption repeats: a binding recognises its row by the plain prompt, so
    two pictures with the same caption and different subjects cannot share one sampling run."""
    groups: list[list[int]] = []
    for i, c in enumerate(captions):
        for g in groups:
            if all(captions[j] != c for j in g):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _sample(model, noise, cond, uncond, steps: int, cfg: float, sampler: str, scheduler: str, latent=None):
    return sample_latents(model, noise, [[cond, {}]], [[uncond, {}]], steps, cfg, sampler, scheduler, latent)


def bindings_for(fusion, texts: torch.Tensor, examples: list, features: list[torch.Tensor],
                 regions: torch.Tensor | None = None) -> list[SubjectBinding]:
    """One binding per picture: its plain caption and that caption with its subject fused."""
    out = []
    for k, (text, e, f) in enumerate(zip(texts, examples, features)):
        with torch.no_grad():
            fused = fused_context(fusion, text, e.positions, [f])
        out.append(SubjectBinding(plain=text, fused=fused.to(text.dtype),
                                  region=None if regions is None else regions[k]))
    return out


@torch.no_grad()
def run_batches(base, adapter: LoadedAdapter, examples: list, features: list[torch.Tensor], noise: torch.Tensor,
                spec: SampleSpec, start: torch.Tensor | None = None,
                regions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Base, MoA soft and MoA hard pictures (and the router map) for every example, same noise.
    start: photos to swap (inverted on the base, then regenerated); regions: where MoA may act."""
    uncond = world.embed(world.caption_tokens(None, None))
    out = {k: torch.zeros_like(noise) for k in ("base", "soft", "hard", "inverted")}
    out["router"] = torch.zeros(noise.shape[0], *noise.shape[-2:])
    for group in distinct_caption_groups([e.caption for e in examples]):
        idx = torch.tensor(group)
        cond = torch.stack([examples[i].text for i in group])
        unc = uncond[None].expand(len(group), -1, -1).contiguous()
        picked = [examples[i] for i in group]
        binds = bindings_for(adapter.adapter.fusion, cond, picked, [features[i] for i in group],
                             None if regions is None else regions[idx])
        if start is None:
            args = (noise[idx], cond, unc, spec.steps, spec.cfg, spec.sampler, spec.scheduler)
        else:
            inv = invert_latent(base, [[cond, {}]], [[unc, {}]], {"samples": start[idx]}, spec.swap_steps,
                                spec.swap_scheduler, spec.invert_cfg, spec.swap_refine, regions[idx].float(),
                                spec.swap_renoise, seed=int(idx[0]))["samples"].float()
            out["inverted"][idx] = inv
            args = (torch.zeros_like(inv), cond, unc, spec.swap_steps, spec.swap_cfg, spec.swap_sampler,
                    spec.swap_scheduler, inv)
        out["base"][idx] = _sample(base, *args)
        knobs = {"strength": spec.strength, "start_percent": spec.start_percent}
        soft = apply_moa(base, adapter, binds, sparse_threshold=spec.sparse_threshold, **knobs)
        out["soft"][idx] = _sample(soft, *args)
        out["router"][idx] = get_controller(soft).recorder.average()[: len(group)]
        out["hard"][idx] = _sample(apply_moa(base, adapter, binds, hard_routing=True, **knobs), *args)
    return out


def drawn_descriptor(latent: torch.Tensor, background: str) -> torch.Tensor | None:
    """The descriptor of the object a model drew on its caption's background, None when there is
    no object (fewer than 4 pixels depart from the background) or no clean background."""
    mask = world.object_mask_from_latent(latent, background)
    if int(mask.sum()) > MAX_OBJECT_PIXELS:
        return None
    return encoder.descriptor(latent, mask.float())


def rank_in_class(d: torch.Tensor | None, refs: torch.Tensor, classes: list[str], target: int,
                  centre: torch.Tensor) -> int:
    """Rank of reference `target` among the references of its class by centred cosine to the
    descriptor `d` (1 = nearest); last when there is no descriptor."""
    same = [j for j, c in enumerate(classes) if c == classes[target]]
    if d is None:
        return len(same)
    scores = {j: cosine(d - centre, refs[j] - centre) for j in same}
    return 1 + sum(1 for j in same if j != target and scores[j] > scores[target])


def retrieval(latents: torch.Tensor, backgrounds: list[str], classes: list[str], refs: torch.Tensor,
              target: list[int], centre: torch.Tensor) -> dict[str, float]:
    """Per picture the rank of reference `target[i]` among the references of picture i's class
    (1 = nearest by centred cosine); a picture without an object ranks last. Returns top-1, the
    mean rank, the mean centred cosine to the target (0 without an object) and the share of
    pictures with an object."""
    ranks, sims, found = [], [], 0
    for i, (lat, bg) in enumerate(zip(latents, backgrounds)):
        d = drawn_descriptor(lat, bg)
        ranks.append(rank_in_class(d, refs, classes, target[i], centre))
        sims.append(0.0 if d is None else cosine(d - centre, refs[target[i]] - centre))
        found += d is not None
    n = len(ranks)
    return {"top1": sum(r == 1 for r in ranks) / n, "mean_rank": sum(ranks) / n, "cosine": sum(sims) / n,
            "found": found / n}


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask.float()[:, None], 3, 1, 1)[:, 0]


def context_numbers(pictures: dict, backgrounds: list[str], mask: torch.Tensor | None = None) -> dict[str, float]:
    """Change of MoA (soft, hard) against the base inside / outside the subject: `mask` when the
    layout is known (the swapped photo's object), else the objects base and MoA drew, dilated."""
    base, soft, hard = pictures["base"], pictures["soft"], pictures["hard"]
    if mask is None:
        mask = dilate(torch.stack([world.object_mask_from_latent(x, bg) | world.object_mask_from_latent(y, bg)
                                   for x, y, bg in zip(base, soft, backgrounds)]))
    out = {}
    out["change_in"], out["change_out"] = change_inside_outside(soft, base, mask)
    out["hard_change_in"], out["hard_change_out"] = change_inside_outside(hard, base, mask)
    out["soft_vs_hard_in"], out["soft_vs_hard_out"] = change_inside_outside(soft, hard, mask)
    out["context_ratio"] = out["change_out"] / out["change_in"] if out["change_in"] else float("nan")
    return out


@dataclass
class Judged:
    """What the judge needs of an evaluation set (run.EvalSet carries these)."""
    examples: list              # one scene per identity: caption, class-word position
    features: list              # the reference feature of each identity
    refs: torch.Tensor          # [n, 10] reference descriptors
    classes: list[str]
    backgrounds: list[str]


def _identity(out: dict, pictures: dict, js: Judged, target: list[int], centre: torch.Tensor, tag: str) -> None:
    for name in ("soft", "hard", "base"):
        r = retrieval(pictures[name], js.backgrounds, js.classes, js.refs, target, centre)
        out.update({f"{name}_{tag}{k}": v for k, v in r.items()})


@torch.no_grad()
def txt2img_numbers(base, adapter: LoadedAdapter, js: Judged, centre: torch.Tensor, spec: SampleSpec,
                    seed: int) -> tuple[dict, dict]:
    """Pictures from pure noise (same seed for base, MoA soft and hard): context change, identity
    retrieval of the subject's own identity."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(js.examples), world.CHANNELS, world.SIZE, world.SIZE), generator=g)
    pictures = run_batches(base, adapter, js.examples, js.features, noise, spec)
    out = context_numbers(pictures, js.backgrounds)
    _identity(out, pictures, js, list(range(len(js.examples))), centre, "")
    return out, pictures


@torch.no_grad()
def swap_numbers(base, adapter: LoadedAdapter, js: Judged, photos: torch.Tensor, masks: torch.Tensor, old: list[int],
                 centre: torch.Tensor, spec: SampleSpec) -> tuple[dict, dict]:
    """The pack's subject swap: photo i (holding identity old[i], on picture i's background and
    caption) inverted on the base, regenerated with MoA and subject i inside the old object's
    region (its mask dilated 1 px). Identity retrieval of the new and of the old subject; change
    inside / outside that known region; how well the base alone gives the photo back, and how
    much of the photo outside the region MoA's picture keeps."""
    regions = dilate(masks > 0.5)
    noise = torch.zeros_like(photos)
    pictures = run_batches(base, adapter, js.examples, js.features, noise, spec, start=photos, regions=regions)
    pictures["start"] = photos
    out = context_numbers(pictures, js.backgrounds, mask=regions)
    _identity(out, pictures, js, list(range(len(js.examples))), centre, "new_")
    _identity(out, pictures, js, old, centre, "old_")
    out["base_reconstruction_error"] = float((pictures["base"] - photos).abs().mean())
    # what the user keeps of the photo: MoA's picture against the photo outside the region
    out["photo_change_out"] = change_inside_outside(pictures["soft"], photos, regions)[1]
    return out, pictures
