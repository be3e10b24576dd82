"""The multimodal prompt built with ComfyUI's CLIP and CLIP_VISION objects.

Kept apart from the pure-torch fusion so that only this file follows ComfyUI's tokenizer
and image-encoder APIs."""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .call_state import SubjectBinding
from .fusion import FusionMLP, fuse_prompt
from .prompt_tokens import WordTokens, bind_subjects
from .subject_images import prepare_subject_batch


@dataclass
class SubjectInput:
    images: torch.Tensor
    masks: torch.Tensor
    class_word: str
    region: torch.Tensor | None = None


def _sd_tokenizer(clip):
    tok = getattr(clip.tokenizer, "clip_l", None)
    if tok is None:
        raise ValueError("MoA needs an SD1.5 CLIP (text encoder 'clip_l'); this CLIP has "
                         f"{type(clip.tokenizer).__name__}. Load the CLIP of an SD1.5 checkpoint")
    return tok


def token_chunks(clip, text: str) -> tuple[dict, list[list[int]]]:
    tokens = clip.tokenize(text)
    if "l" not in tokens:
        raise ValueError(f"MoA needs an SD1.5 CLIP; its tokenizer produced {sorted(tokens)} instead of 'l'")
    chunks = [[int(t[0]) if not torch.is_tensor(t[0]) else -1 for t in chunk] for chunk in tokens["l"]]
    return tokens, chunks


def word_tokens(clip, word: str) -> WordTokens:
    tok = _sd_tokenizer(clip)
    _, chunks = token_chunks(clip, word)
    ids = chunks[0][tok.tokens_start:]
    end = tok.end_token
    ids = ids[: ids.index(end)] if end in ids else ids
    return WordTokens(word, tuple(ids))


def describe(clip, chunks: list[list[int]]) -> str:
    tok = _sd_tokenizer(clip)
    special = {tok.start_token, tok.end_token, getattr(tok, "pad_token", None)}
    ids = [t for c in chunks for t in c if t not in special and t >= 0]   # -1: a textual-inversion embedding
    words = tok.tokenizer.convert_ids_to_tokens(ids)
    return "[" + ", ".join(repr(w.replace("</w>", "")) for w in words) + "]"


# per image-encoder object (weakly held, so a freed encoder takes its entries along)
_FEATURE_CACHE: "weakref.WeakKeyDictionary[object, OrderedDict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
_FEATURE_CACHE_SIZE = 32


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def image_feature(clip_vision, subject: SubjectInput, label: str) -> torch.Tensor:
    """Mean projected CLIP image embedding of the subject's prepared reference photos.

    Cached by content: changing strength or the prompt re-runs MoA Apply, and a ViT-L pass
    per photo is the slowest part of it."""
    cache = _FEATURE_CACHE.setdefault(clip_vision, OrderedDict())
    key = (_fingerprint(subject.images), _fingerprint(subject.masks))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    size = int(getattr(clip_vision, "image_size", 224))
    prepared = prepare_subject_batch(subject.images, subject.masks, size=size, label=label)
    embeds = clip_vision.encode_image(prepared, crop=False)["image_embeds"]
    feature = embeds.float().mean(dim=0).cpu()
    cache[key] = feature
    while len(cache) > _FEATURE_CACHE_SIZE:
        cache.popitem(last=False)
    return feature


def image_feature_dim(clip_vision) -> int | None:
    proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    return getattr(proj, "out_features", None)


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


def build_bindings(clip, clip_vision, fusion: FusionMLP, text: str,
                   subjects: list[SubjectInput]) -> tuple[list, list[SubjectBinding]]:
    """Encode `text` like CLIPTextEncode does and fuse the subjects into it.

    Returns (the CONDITIONING the sampler must get, one binding per conditioning entry)."""
    tokens, chunks = token_chunks(clip, text)
    words = [word_tokens(clip, s.class_word) for s in subjects]
    positions = bind_subjects(chunks, words, describe_tokens=lambda c: describe(clip, c))
    features = [image_feature(clip_vision, s, f"MoA Subject '{s.class_word}'") for s in subjects]
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    region = union_region(subjects)
    bindings = []
    for cond_tensor, _extra in conditioning:
        plain = cond_tensor[0].detach()
        fused = fuse_prompt(fusion, plain.float().cpu(), list(zip(positions, features))).to(plain.dtype)
        bindings.append(SubjectBinding(plain=plain.cpu(), fused=fused, region=region))
    return conditioning, bindings
