"""Score every picture in an evaluation folder and write the table as CSV and JSON."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..scoring.evaluator import Evaluator, Picture
from ..scoring.report import METRIC_KEYS, METRICS, csv_value, json_value, mean_of, text_table
from .manifest import MANIFEST, BadLine, Entry, read_manifest

COLUMNS = ("line", "image", "label", "status", *METRIC_KEYS, "errors")


def _must_exist(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")


def _read_image(path: Path, what: str, pixels: Callable) -> torch.Tensor:
    """pixels(PIL image) as a float tensor in [0, 1]; the reason in a ValueError when the file is no image."""
    from PIL import Image, UnidentifiedImageError
    _must_exist(path, what)
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(pixels(im), np.float32) / 255.0)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({e})") from e


def load_image(path: Path, what: str) -> torch.Tensor:
    """[H, W, 3] float in [0, 1]."""
    return _read_image(path, what, lambda im: im.convert("RGB"))


def load_mask(path: Path, what: str) -> torch.Tensor:
    """[H, W] float in [0, 1] (white = 1); the alpha channel when the image has one."""
    return _read_image(path, what, lambda im: im.getchannel("A") if "A" in im.getbands() else im.convert("L"))


def load_latent(path: Path, what: str) -> torch.Tensor:
    """[C, h, w] from a .latent file (ComfyUI's Save Latent: key latent_tensor) or a .safetensors
    file holding one tensor."""
    from safetensors.torch import load_file
    _must_exist(path, what)
    try:
        tensors = load_file(str(path))
    except Exception as e:   # noqa: BLE001 - any unreadable file is the same refusal
        raise ValueError(f"{what} {path} is not a safetensors latent ({type(e).__name__}: {e})") from e
    t = tensors.get("latent_tensor")
    if t is None:
        big = [v for v in tensors.values() if v.ndim >= 3]
        if len(big) != 1:
            raise ValueError(f"{what} {path}: expected ComfyUI's latent_tensor (Save Latent) or one tensor, "
                             f"found {sorted(tensors)}")
        t = big[0]
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{what} {path} holds {t.shape[0]} latents: save one per picture")
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{what} {path}: expected a latent [C, h, w], got shape {list(t.shape)}")
    return t.float()


def _picture(entry: Entry, errors: list[str]) -> Picture:
    """The entry's files as tensors. The picture itself must load; an optional file that does not
    is reported in `errors`, and only the metrics that need it go without numbers."""
    pic = Picture(image=load_image(entry.image, "image"), label=entry.label, prompt=entry.prompt,
                  face_box=entry.face_box, reference_face_box=entry.reference_face_box)

    def optional(name: str, load):
        try:
            return load()
        except (FileNotFoundError, ValueError) as e:
            errors.append(f"{name}: {e}")
            return None

    if entry.baseline is not None:
        pic.baseline = optional("context", lambda: load_image(entry.baseline, "baseline"))
    if entry.mask is not None:
        pic.mask = optional("mask", lambda: load_mask(entry.mask, "mask"))
    if entry.router_map is not None:
        pic.router_map = optional("router", lambda: load_mask(entry.router_map, "router map"))
    if entry.latent is not None and entry.baseline_latent is not None:
        pic.latent = optional("latent context", lambda: load_latent(entry.latent, "latent"))
        pic.baseline_latent = optional("latent context", lambda: load_latent(entry.baseline_latent, "baseline latent"))
    elif entry.latent is not None or entry.baseline_latent is not None:
        errors.append("latent context: give both latent and baseline_latent")
    if entry.references:
        def refs():
            images = [load_image(p, "reference") for p in entry.references]
            if len({tuple(i.shape) for i in images}) > 1:
                raise ValueError("reference photos differ in size: give photos of one size (or one reference)")
            masks = [load_mask(p, "reference mask") for p in entry.reference_masks]
            if masks and any(m.shape != i.shape[:2] for m, i in zip(masks, images)):
                raise ValueError("a reference mask's size differs from its reference photo's")
            return torch.stack(images), (torch.stack(masks) if masks else None)
        loaded = optional("identity", refs)
        if loaded is not None:
            pic.references, pic.reference_masks = loaded
            pic.reference_key = (tuple(map(str, entry.references)), tuple(map(str, entry.reference_masks)),
                                 tuple(entry.reference_face_box or ()))
    return pic


def evaluate_folder(folder: Path, evaluator: Evaluator, manifest: str = MANIFEST) -> list[dict]:
    """One row per manifest line: its numbers (NaN where not computed), status ok / partial / error
    and the errors (one per metric that could not be computed, or the reason the line has none)."""
    rows = []
    for entry in read_manifest(Path(folder), manifest):
        if isinstance(entry, BadLine):
            rows.append(_row(entry.line, entry.image, entry.image, {}, [f"manifest: {entry.message}"]))
            continue
        rel = _rel(entry.image, folder)
        errors: list[str] = []
        try:
            pic = _picture(entry, errors)
        except (FileNotFoundError, ValueError) as e:
            rows.append(_row(entry.line, rel, entry.label, {}, [f"image: {e}"]))
            continue
        scores = evaluator.score(pic)
        rows.append(_row(entry.line, rel, entry.label, scores, errors + scores.pop("errors")))
    return rows


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _row(line: int, image: str, label: str, scores: dict, errors: list[str]) -> dict:
    numbers = {k: scores.get(k, float("nan")) for k in METRIC_KEYS}
    has = any(isinstance(v, float) and v == v for v in numbers.values())
    status = "ok" if not errors else ("partial" if has else "error")
    return {"line": line, "image": image, "label": label, "status": status, **numbers, "errors": errors}


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([csv_value(r[c]) if c != "errors" else " | ".join(r["errors"]) for c in COLUMNS])
    return path


def write_json(rows: list[dict], path: Path, config: dict) -> Path:
    doc = {
        "config": config,
        "metrics": {k: how for k, _, _, how in METRICS},
        "mean": {k: json_value(mean_of(r[k] for r in rows)) for k in METRIC_KEYS},
        "rows": [{k: (json_value(v) if k in METRIC_KEYS else v) for k, v in r.items()} for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def summary_text(rows: list[dict]) -> str:
    """The table and one line per problem, as the CLI prints it."""
    lines = [text_table(rows)]
    problems = [f"line {r['line']} ({r['label'] or 'no image'}): {e}" for r in rows for e in r["errors"]]
    if problems:
        lines += ["", f"problems ({sum(r['status'] != 'ok' for r in rows)} of {len(rows)} rows):"]
        lines += [f"  {p}" for p in problems]
    return "\n".join(lines)
