"""A dataset record to an Example: decoded (pictures, masks, reference cut-outs) then passed
through the frozen encoders (VAE, CLIP text, CLIP vision).

The two halves are separate so decoding runs in DataLoader workers (decode_record is plain
PIL/numpy/torch) while the main process keeps the encoders busy (encode_decoded). Prompts and
reference photos go through the same functions MoA Apply uses (comfyui.prompt.encode_prompt,
comfyui.subjects.subject_feature), so an adapter is trained on exactly the context it will see
at inference. cache.py stores each Example once on disk."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comfyui.models import model_base
from ..comfyui.prompt import encode_prompt
from ..comfyui.sampling import image_to_latent, unet_y
from ..comfyui.subjects import subject_feature
from ..engine.errors import MoAInputError
from .config import TrainConfig
from .records import Record


@dataclass
class Example:
    latent: torch.Tensor            # [4, h, w] scaled latent
    text: torch.Tensor              # [L, D] text-encoder output (D: 768, SDXL 2048)
    positions: list[list[int]]      # per subject, token positions
    features: list[torch.Tensor]    # per subject, [768] image feature
    masks: torch.Tensor             # [S, h, w] latent-resolution subject masks
    caption: str
    y: torch.Tensor | None = None       # [2816] SDXL's `y` (pooled text + size embeddings); None on SD1.5
    pooled: torch.Tensor | None = None  # [1280] SDXL's pooled text output, for the samples' conditioning


@dataclass
class Decoded:
    """What the encoders read of one record, decoded from its files (no encoder involved)."""
    where: str                                          # the record's place in the dataset, for messages
    image: torch.Tensor                                 # [H, W, 3] at the training resolution
    caption: str
    class_words: list[str]
    masks: torch.Tensor                                 # [S, h, w] latent-resolution subject masks
    references: list[tuple[list[torch.Tensor], list[torch.Tensor] | None]]   # per subject: photos, masks


def decode_record(rec: Record, resolution: int) -> Decoded:
    """The record's picture, masks and reference photos (cut out and augmented as its layout
    says), as tensors; runs in a DataLoader worker."""
    return Decoded(rec.where, rec.image_tensor(resolution), rec.caption, [s.class_word for s in rec.subjects],
                   torch.stack([s.mask_tensor(resolution // 8) for s in rec.subjects]),
                   [s.reference_tensors() for s in rec.subjects])


def reference_feature(clip_vision, images: list[torch.Tensor], masks: list[torch.Tensor] | None,
                      label: str) -> torch.Tensor:
    """A subject's references as MoA Subject would pass them: one IMAGE batch (+ masks) when
    they share a size, else the mean of each photo's feature."""
    if len({tuple(im.shape) for im in images}) == 1:
        return subject_feature(clip_vision, torch.stack(images), torch.stack(masks) if masks else None, label)
    return torch.stack([subject_feature(clip_vision, im[None], masks[i][None] if masks else None, label)
                        for i, im in enumerate(images)]).mean(dim=0)


@torch.no_grad()
def encode_decoded(d: Decoded, model, clip, vae, clip_vision) -> Example:
    """The frozen encoders' outputs for one decoded record (on the CPU, fp32)."""
    latent = image_to_latent(model, vae, d.image[None]).float()[0]
    prompt = encode_prompt(clip, d.caption, d.class_words, model_base(model).name)
    if prompt.chunks != 1:
        raise MoAInputError(f"{d.where}: caption longer than 75 tokens; shorten it")
    features = [reference_feature(clip_vision, images, masks, f"{d.where} '{word}'")
                for word, (images, masks) in zip(d.class_words, d.references)]
    y = unet_y(model, prompt.conditioning, width=int(d.image.shape[-2]), height=int(d.image.shape[-3]))
    pooled = prompt.conditioning[0][1].get("pooled_output")
    pooled = None if pooled is None else pooled[0].float().cpu()
    return Example(latent.cpu(), prompt.plain.float().cpu(), prompt.positions, [f.float().cpu() for f in features],
                   d.masks, d.caption, None if y is None else y.cpu(), pooled)


def encode_record(cfg: TrainConfig, rec: Record, model, clip, vae, clip_vision) -> Example:
    """decode_record then encode_decoded, in this process."""
    return encode_decoded(decode_record(rec, cfg.resolution), model, clip, vae, clip_vision)
