"""The evaluation folder's sidecar manifest, `manifest.jsonl`: one generated picture per line,
paths relative to the folder, every key but "image" optional:

    {"image": "moa/0001.png", "label": "strength 1, seed 1", "prompt": "a man at the beach",
     "baseline": "base/0001.png", "mask": "masks/0001.png", "router_map": "maps/0001.png",
     "references": ["refs/man.png"], "reference_masks": ["refs/man_mask.png"],
     "face_box": [180, 62, 274, 184], "reference_face_box": [180, 62, 274, 184]}

- baseline: the same seed and settings without the subject (or MoA strength 0), same size;
- mask: where the subject is in the picture (white = subject), same size as the picture;
- router_map: MoA Router Maps' mask saved as an image (white = personalized expert), any size;
- latent / baseline_latent: the two sampler outputs as ComfyUI's Save Latent writes them (.latent),
  for the change on latents (one latent per file);
- references (or "reference"): photos of the subject; reference_masks: the subject in them;
- face_box / reference_face_box: [x0, y0, x1, y1] pixels of the face to score when there are several.
Blank lines and lines starting with # are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.files import JsonLine, read_json_lines

MANIFEST = "manifest.jsonl"
PATH_KEYS = ("image", "baseline", "mask", "router_map", "latent", "baseline_latent")
KNOWN_KEYS = {*PATH_KEYS, "label", "prompt", "references", "reference", "reference_masks", "face_box",
              "reference_face_box"}


@dataclass
class Entry:
    line: int
    image: Path
    label: str
    prompt: str | None = None
    baseline: Path | None = None
    mask: Path | None = None
    router_map: Path | None = None
    latent: Path | None = None
    baseline_latent: Path | None = None
    references: list[Path] = field(default_factory=list)
    reference_masks: list[Path] = field(default_factory=list)
    face_box: list[float] | None = None
    reference_face_box: list[float] | None = None


@dataclass
class BadLine:
    line: int
    message: str
    image: str = ""


def _box(value, key: str) -> list[float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f'"{key}" must be [x0, y0, x1, y1] in pixels, got {json.dumps(value)}')
    return [float(v) for v in value]


def _paths(value, key: str, folder: Path) -> list[Path]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f'"{key}" must be a path or a list of paths, got {json.dumps(value)}')
    return [folder / v for v in items]


def parse_line(obj: dict, line: int, folder: Path) -> Entry:
    """One manifest object as an Entry; ValueError with the reason when it cannot be one."""
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError('"image" (the generated picture\'s path) is missing')
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}")
    if "reference" in obj and "references" in obj:
        raise ValueError('give "reference" or "references", not both')
    for key in PATH_KEYS[1:]:
        if key in obj and not (isinstance(obj[key], str) and obj[key]):
            raise ValueError(f'"{key}" must be a path, got {json.dumps(obj[key])}')
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f'"prompt" must be a string, got {json.dumps(prompt)}')
    refs = _paths(obj.get("references", obj.get("reference")), "references", folder)
    ref_masks = _paths(obj.get("reference_masks"), "reference_masks", folder)
    if ref_masks and len(ref_masks) != len(refs):
        raise ValueError(f"{len(refs)} reference(s) but {len(ref_masks)} reference mask(s): give one mask per reference")
    paths = {key: folder / obj[key] if obj.get(key) else None for key in PATH_KEYS[1:]}
    return Entry(line=line, image=folder / image, label=str(obj.get("label") or image), prompt=prompt or None,
                 **paths, references=refs, reference_masks=ref_masks,
                 face_box=_box(obj.get("face_box"), "face_box"),
                 reference_face_box=_box(obj.get("reference_face_box"), "reference_face_box"))


def read_manifest(folder: Path, name: str = MANIFEST) -> list[Entry | BadLine]:
    """Every line, parsed or with the reason it cannot be; FileNotFoundError without a manifest."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {folder}: write one line per generated picture, e.g. "
                                f'{{"image": "moa/0001.png", "baseline": "base/0001.png", "mask": "masks/0001.png"}}')
    return [_entry(row, Path(folder)) for row in read_json_lines(path)]


def _entry(row: JsonLine, folder: Path) -> Entry | BadLine:
    if row.value is None:
        return BadLine(row.line, row.problem)
    try:
        return parse_line(row.value, row.line, folder)
    except ValueError as e:
        return BadLine(row.line, str(e), str(row.value.get("image") or ""))
