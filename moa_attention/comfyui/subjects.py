"""Subjects into the multimodal prompt, with ComfyUI's CLIP and CLIP_VISION objects.

The one path from (photos, masks, class words, prompt) to the fused context the personalized
expert sees: MoA Apply and the trainer both call it, so what an adapter is trained on is what
it gets at inference."""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..engine.bases import SD15
from ..engine.errors import MoAInputError
from ..engine.fusion import FusionMLP, fuse_prompt
from ..engine.masks import resize_mask
from ..engine.morph import interpolate_features
from ..engine.subject_images import prepare_subject_batch
from .batch import SubjectBinding
from .prompt import encode_prompt


@dataclass(frozen=True)
class SubjectInput:
    """One subject as MoA Subject builds it (the MOA_SUBJECTS list holds these)."""
    images: torch.Tensor                    # [B, H, W, 3] reference photos
    masks: torch.Tensor                     # [B, H, W], 1 = subject
    class_word: str
    region: torch.Tensor | None = None      # [H, W] where in the output it may appear, or None
    # morphing: this subject's identity interpolated towards `morph_to`'s, one image per factor
    morph_to: "SubjectInput | None" = None
    factors: tuple[float, ...] = ()
    latent_batch: int | None = None         # how many latents the morph's LATENT output holds

    def __post_init__(self) -> None:
        if self.region is not None and not bool((self.region > 0.5).any()):
            raise MoAInputError(f"{subject_label(self)}: the region mask is empty, so the subject could appear "
                                f"nowhere. Paint where it may appear, or leave 'region' unconnected")


# per image-encoder object (weakly held, so a freed encoder takes its entries along)
_FEATURE_CACHE: "weakref.WeakKeyDictionary[object, OrderedDict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
_FEATURE_CACHE_SIZE = 32


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def subject_feature(clip_vision, images: torch.Tensor, masks: torch.Tensor | None, label: str) -> torch.Tensor:
    """[I] mean projected CLIP image embedding of a subject's prepared reference photos.

    Cached by content: changing strength or the prompt re-runs MoA Apply, and a ViT-L pass
    per photo is the slowest part of it."""
    cache = _FEATURE_CACHE.setdefault(clip_vision, OrderedDict())
    key = (_fingerprint(images), None if masks is None else _fingerprint(masks))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    size = int(getattr(clip_vision, "image_size", 224))
    prepared = prepare_subject_batch(images, masks, size=size, label=label)
    embeds = clip_vision.encode_image(prepared, crop=False)["image_embeds"]
    feature = embeds.float().mean(dim=0).cpu()
    cache[key] = feature
    while len(cache) > _FEATURE_CACHE_SIZE:
        cache.popitem(last=False)
    return feature


def fused_context(fusion: FusionMLP, plain: torch.Tensor, positions: list[list[int]],
                  features: list[torch.Tensor]) -> torch.Tensor:
    """[L, D] the prompt the personalized cross-attention sees (differentiable in `fusion`)."""
    return fuse_prompt(fusion, plain.float(), [(p, f.to(plain.device)) for p, f in zip(positions, features)])


def _regions_same_size(subjects: list[SubjectInput]) -> torch.Tensor:
    """[S, H, W] the subjects' regions at the first one's size."""
    size = subjects[0].region.shape[-2:]
    return torch.stack([resize_mask(s.region.cpu(), size).clamp(0, 1) for s in subjects])


def subject_regions(subjects: list[SubjectInput]) -> torch.Tensor | None:
    """[S, H, W] one region per subject, or None when no subject has one. Refuses a mix of
    subjects with and without regions, and regions that overlap (a pixel would not know which
    subject's tokens to attend to)."""
    have = [s.region is not None for s in subjects]
    if not any(have):
        return None
    if not all(have):
        missing = [subject_label(s) for s in subjects if s.region is None]
        raise MoAInputError(f"some subjects have a region and {', '.join(missing)} has none: give every subject "
                            f"its own region (each subject then stays inside its own), or none")
    regions = _regions_same_size(subjects)
    solid = regions > 0.5
    for i in range(len(subjects)):
        for j in range(i):
            both = int((solid[i] & solid[j]).sum())
            if both:
                raise MoAInputError(f"the regions of {subject_label(subjects[j])} and {subject_label(subjects[i])} "
                                    f"overlap ({both} pixels): each pixel may belong to one subject only. Make the "
                                    f"region masks disjoint")
    return regions


def subject_label(subject: SubjectInput) -> str:
    return f"MoA Subject '{subject.class_word}'"


def subject_features(clip_vision, subject: SubjectInput) -> torch.Tensor:
    """[I], or [K, I] for a morph: one interpolated identity per factor."""
    feature = subject_feature(clip_vision, subject.images, subject.masks, subject_label(subject))
    if subject.morph_to is None:
        return feature
    other = subject_feature(clip_vision, subject.morph_to.images, subject.morph_to.masks, subject_label(subject.morph_to))
    return interpolate_features(feature, other, subject.factors)


def sequence_length(features: list[torch.Tensor]) -> int:
    """K of a morph sequence (1 without one); all morphs in one prompt must render as many factors."""
    lengths = {f.shape[0] for f in features if f.ndim == 2}
    if len(lengths) > 1:
        raise MoAInputError(f"morphed subjects render different numbers of factors {sorted(lengths)}; give every "
                            f"MoA Subject Morph in one prompt the same factors")
    return lengths.pop() if lengths else 1


def morph_latent_batch(subjects: list[SubjectInput]) -> int | None:
    """How many latents the morphs' LATENT output holds (None without a morph): the sampler that
    renders the sequence must get that batch. Two morphs given different latents are refused."""
    sizes = {s.latent_batch for s in subjects if s.latent_batch is not None}
    if len(sizes) > 1:
        raise MoAInputError(f"the morphed subjects were made for latents of different batch sizes "
                            f"{sorted(sizes)}; connect the same latent to every MoA Subject Morph of one prompt")
    return sizes.pop() if sizes else None


def _fuse_all(fusion: FusionMLP, plain: torch.Tensor, positions: list[list[int]], features: list[torch.Tensor],
              k: int, only: int | None = None) -> torch.Tensor:
    """[L, D] (k == 1) or [k, L, D]: the prompt fused with every subject, or with subject `only`."""
    out = []
    for i in range(k):
        picked = [(p, f if f.ndim == 1 else f[i]) for j, (p, f) in enumerate(zip(positions, features))
                  if only is None or j == only]
        with torch.no_grad():
            out.append(fused_context(fusion, plain, [p for p, _ in picked], [f for _, f in picked]))
    return out[0] if k == 1 else torch.stack(out)


def build_bindings(clip, clip_vision, fusion: FusionMLP, text: str, subjects: list[SubjectInput],
                   base: str = SD15.name) -> tuple[list, list[SubjectBinding]]:
    """Encode `text` like CLIPTextEncode does and fuse the subjects into it. Only the
    cross-attention tokens are fused: SDXL's pooled output and size conditioning stay the
    plain prompt's, so uncond rows and pixels routed to the prior stay the base model's.

    Returns (the CONDITIONING the sampler must get, one binding per conditioning entry)."""
    regions = subject_regions(subjects)
    prompt = encode_prompt(clip, text, [s.class_word for s in subjects], base)
    features = [subject_features(clip_vision, s) for s in subjects]
    k = sequence_length(features)
    latent_batch = morph_latent_batch(subjects)
    bindings = []
    for cond_tensor, _extra in prompt.conditioning:
        plain = cond_tensor[0].detach()
        cpu = plain.cpu()
        fused = _fuse_all(fusion, cpu, prompt.positions, features, k).to(plain.dtype)
        per_subject = None
        if regions is not None:
            per_subject = torch.stack([_fuse_all(fusion, cpu, prompt.positions, features, k, only=j)
                                       for j in range(len(subjects))], dim=-3).to(plain.dtype)
        bindings.append(SubjectBinding(plain=cpu, fused=fused, region=None if regions is None else regions.sum(0).clamp(0, 1),
                                       subject_fused=per_subject, subject_regions=regions,
                                       latent_batch=latent_batch))
    return prompt.conditioning, bindings
