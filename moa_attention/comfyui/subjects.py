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

from ..engine.fusion import FusionMLP, fuse_prompt
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


def union_region(subjects: list[SubjectInput]) -> torch.Tensor | None:
    """Where any subject may appear; None (anywhere) when one subject has no region."""
    if any(s.region is None for s in subjects):
        return None
    size = subjects[0].region.shape[-2:]
    out = torch.zeros(size)
    for s in subjects:
        r = s.region.float().cpu()
        if r.shape[-2:] != size:
            r = torch.nn.functional.interpolate(r[None, None], size=size, mode="bilinear")[0, 0]
        out = torch.maximum(out, r.clamp(0, 1))
    return out


def subject_label(subject: SubjectInput) -> str:
    return f"MoA Subject '{subject.class_word}'"


def build_bindings(clip, clip_vision, fusion: FusionMLP, text: str,
                   subjects: list[SubjectInput]) -> tuple[list, list[SubjectBinding]]:
    """Encode `text` like CLIPTextEncode does and fuse the subjects into it.

    Returns (the CONDITIONING the sampler must get, one binding per conditioning entry)."""
    prompt = encode_prompt(clip, text, [s.class_word for s in subjects])
    features = [subject_feature(clip_vision, s.images, s.masks, subject_label(s)) for s in subjects]
    region = union_region(subjects)
    bindings = []
    for cond_tensor, _extra in prompt.conditioning:
        plain = cond_tensor[0].detach()
        with torch.no_grad():
            fused = fused_context(fusion, plain.cpu(), prompt.positions, features).to(plain.dtype)
        bindings.append(SubjectBinding(plain=plain.cpu(), fused=fused, region=region))
    return prompt.conditioning, bindings
