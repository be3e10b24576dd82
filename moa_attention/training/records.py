"""What the trainer reads from any dataset layout: one Record per training image, one
SubjectRecord per subject, and the Problems a validator lists.

A record hands the encoder tensors (image, latent-size masks, reference photos), so a layout
whose masks or references are not files of their own (FastComposer's segment maps) subclasses
these and the encoder stays the same. The defaults load the manifest layout's files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Problem:
    line: int
    message: str
    where: str = ""             # e.g. "id 00012_3" for layouts without line numbers

    def __str__(self) -> str:
        return f"{self.where or f'line {self.line}'}: {self.message}"


@dataclass
class SubjectRecord:
    class_word: str
    mask: Path
    references: list[Path]
    reference_masks: list[Path] | None

    def mask_tensor(self, size: int | None = None) -> torch.Tensor:
        """[H, W] in [0, 1], 1 = subject; resized to a square of `size` when given."""
        return load_mask(self.mask, size)

    def reference_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The reference photos [H, W, 3] and their masks (None: the whole photo is the subject)."""
        masks = [load_mask(p) for p in self.reference_masks] if self.reference_masks else None
        return [load_image(p) for p in self.references], masks

    def cache_files(self) -> list[Path]:
        return [self.mask, *self.references, *(self.reference_masks or [])]

    def cache_tag(self) -> str:
        return self.class_word


@dataclass
class Record:
    line: int
    image: Path
    caption: str
    subjects: list[SubjectRecord]

    @property
    def where(self) -> str:
        return f"manifest.jsonl line {self.line}"

    def image_tensor(self, size: int | None = None) -> torch.Tensor:
        return load_image(self.image, size)

    def cache_files(self) -> list[Path]:
        return [self.image, *(f for s in self.subjects for f in s.cache_files())]

    def cache_tag(self) -> str:
        return f"{self.caption}|{','.join(s.cache_tag() for s in self.subjects)}"


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, after checking it decodes."""
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def _resized(im, mode: str, size: int | None, resample: int) -> torch.Tensor:
    im = im.convert(mode)
    if size is not None:
        im = im.resize((size, size), resample)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """[H, W, 3] float in [0, 1] (ComfyUI IMAGE layout), optionally resized to a square."""
    from PIL import Image
    with Image.open(path) as im:
        return _resized(im, "RGB", size, Image.BICUBIC)


def load_mask(path: Path, size: int | None = None) -> torch.Tensor:
    """[H, W] float in [0, 1], 1 = subject."""
    from PIL import Image
    with Image.open(path) as im:
        return _resized(im, "L", size, Image.BILINEAR)


def mask_from_array(mask: np.ndarray, size: int | None = None) -> torch.Tensor:
    """A boolean [H, W] mask as load_mask would give it from the same mask saved as a file."""
    from PIL import Image
    return _resized(Image.fromarray(mask.astype(np.uint8) * 255), "L", size, Image.BILINEAR)
