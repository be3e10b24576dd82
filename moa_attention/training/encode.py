"""The dataset through the frozen encoders, once, before the loop (and cached on disk).

Prompts and reference photos go through the same functions MoA Apply uses
(comfyui.prompt.encode_prompt, comfyui.subjects.subject_feature), so an adapter is trained
on exactly the context it will see at inference."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..comfyui.prompt import encode_prompt
from ..comfyui.sampling import image_to_latent
from ..comfyui.subjects import subject_feature
from ..engine.errors import MoAInputError
from ..engine.files import atomic_write
from .config import TrainConfig
from .records import Record, SubjectRecord

CACHE_VERSION = "v2"      # bump when what goes into an Example changes


@dataclass
class Example:
    latent: torch.Tensor            # [4, h, w] scaled latent
    text: torch.Tensor              # [L, 768] text-encoder output
    positions: list[list[int]]      # per subject, token positions
    features: list[torch.Tensor]    # per subject, [768] image feature
    masks: torch.Tensor             # [S, h, w] latent-resolution subject masks
    caption: str


def reference_feature(clip_vision, subject: SubjectRecord, label: str) -> torch.Tensor:
    """A subject's references as MoA Subject would pass them: one IMAGE batch (+ masks) when
    they share a size, else the mean of each photo's feature."""
    images, masks = subject.reference_tensors()
    if len({tuple(im.shape) for im in images}) == 1:
        return subject_feature(clip_vision, torch.stack(images), torch.stack(masks) if masks else None, label)
    return torch.stack([subject_feature(clip_vision, im[None], masks[i][None] if masks else None, label)
                        for i, im in enumerate(images)]).mean(dim=0)


@torch.no_grad()
def encode_record(cfg: TrainConfig, rec: Record, model, clip, vae, clip_vision) -> Example:
    image = rec.image_tensor(cfg.resolution)
    latent = image_to_latent(model, vae, image[None]).float()[0]
    prompt = encode_prompt(clip, rec.caption, [s.class_word for s in rec.subjects])
    if prompt.chunks != 1:
        raise MoAInputError(f"{cfg.data}, {rec.where}: caption longer than 75 tokens; shorten it")
    features = [reference_feature(clip_vision, s, f"{rec.where} '{s.class_word}'") for s in rec.subjects]
    masks = torch.stack([s.mask_tensor(cfg.resolution // 8) for s in rec.subjects])
    return Example(latent.cpu(), prompt.plain.float().cpu(), prompt.positions, features, masks, rec.caption)


def _cache_key(cfg: TrainConfig, records: list[Record]) -> str:
    """Changes whenever anything the frozen encoders see changes (files by size and mtime)."""
    h = hashlib.sha256()
    manifest = Path(cfg.data) / "manifest.jsonl"
    files = [cfg.base, cfg.clip_vision, *([manifest] if manifest.is_file() else [])]
    for rec in records:
        files += rec.cache_files()
        h.update(f"{rec.cache_tag()}\n".encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"res={cfg.resolution}|{CACHE_VERSION}".encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    root = os.environ.get("MOA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "comfyui-moa")
    return Path(root) / "encoded"


def save_examples(path: Path, examples: list[Example]) -> None:
    from safetensors.torch import save_file
    tensors, meta = {}, []
    for i, e in enumerate(examples):
        tensors[f"{i}.latent"], tensors[f"{i}.text"], tensors[f"{i}.masks"] = e.latent, e.text, e.masks
        for j, f in enumerate(e.features):
            tensors[f"{i}.feature.{j}"] = f
        meta.append({"positions": e.positions, "caption": e.caption})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"examples": json.dumps(meta)}))


def load_examples(path: Path) -> list[Example]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["examples"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    return [Example(t[f"{i}.latent"], t[f"{i}.text"], m["positions"],
                    [t[f"{i}.feature.{j}"] for j in range(len(m["positions"]))], t[f"{i}.masks"], m["caption"])
            for i, m in enumerate(meta)]


def encoded_examples(cfg: TrainConfig, records: list[Record], model, clip, vae, clip_vision,
                     show: bool) -> list[Example]:
    """Cached between runs (safetensors): resuming, or training again on the same data, skips
    minutes of image encoding."""
    from tqdm import tqdm
    path = cache_dir() / f"{_cache_key(cfg, records)}.safetensors"
    if path.is_file():
        return load_examples(path)
    examples = [encode_record(cfg, rec, model, clip, vae, clip_vision)
                for rec in tqdm(records, desc="encoding dataset", disable=not show)]
    try:
        save_examples(path, examples)
    except OSError as e:
        print(f"note: could not cache the encoded dataset in {path.parent} ({e})")
    return examples
