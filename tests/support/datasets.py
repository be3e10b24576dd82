"""Tiny synthetic MoA training datasets (images, masks, references, manifest)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _scene(rng: np.random.Generator, size: int, color: tuple[int, int, int], cx: float, cy: float, r: float):
    yy, xx = np.mgrid[:size, :size]
    bg = np.stack([np.full((size, size), c) for c in rng.integers(30, 220, 3)], -1).astype(np.float32)
    bg += (xx[..., None] / size * 40 - 20)
    mask = ((xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2) <= r ** 2
    img = bg.copy()
    img[mask] = np.array(color, np.float32) + rng.normal(0, 8, (int(mask.sum()), 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), Image.fromarray((mask * 255).astype(np.uint8))


def write_dataset(root: Path, n: int = 4, size: int = 64, seed: int = 0, two_subjects_every: int = 2) -> Path:
    """n rows of "a photo of a dog ..." (every `two_subjects_every`-th row also has a cat)."""
    rng = np.random.default_rng(seed)
    for d in ("images", "masks", "refs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        subjects = [("dog", (200, 120, 40))]
        if two_subjects_every and i % two_subjects_every == 1:
            subjects.append(("cat", (60, 60, 200)))
        yy, xx = np.mgrid[:size, :size]
        img = None
        entry_subjects = []
        base = np.zeros((size, size, 3), np.float32) + rng.integers(30, 220, 3)
        for j, (word, color) in enumerate(subjects):
            cx, cy = size * (0.3 + 0.4 * j) + rng.uniform(-4, 4), size * 0.5 + rng.uniform(-6, 6)
            r = size * 0.18
            m = ((xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2) <= r ** 2
            base[m] = color
            Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"{i:03d}_{word}.png")
            ref, ref_mask = _scene(rng, size, color, size / 2, size / 2, size * 0.3)
            ref.save(root / "refs" / f"{i:03d}_{word}.png")
            ref_mask.save(root / "refs" / f"{i:03d}_{word}_mask.png")
            entry_subjects.append({"class_word": word, "mask": f"masks/{i:03d}_{word}.png",
                                   "references": [f"refs/{i:03d}_{word}.png"],
                                   "reference_masks": [f"refs/{i:03d}_{word}_mask.png"]})
        img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        img.save(root / "images" / f"{i:03d}.png")
        caption = "a photo of a dog and a cat in a garden" if len(subjects) == 2 else "a photo of a dog on the grass"
        rows.append({"image": f"images/{i:03d}.png", "caption": caption, "subjects": entry_subjects})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root
