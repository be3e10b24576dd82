"""Appending one training example to a dataset folder in the trainer's manifest layout.

The layout (read by training/dataset.py): `manifest.jsonl`, one JSON object per line, and the
files it names under `images/`, `masks/` and `refs/`. An example's files get a number no other
file of the folder has (claimed with an exclusive create, so two writers never share one and an
existing file is never replaced); each is written to a temporary file and renamed onto its
claimed name; the manifest line comes last, in one append, so a reader never sees a row whose
files are not complete. Pure torch + PIL: the ComfyUI side (output directory, MoA Subject's
chain) is in comfyui/dataset_examples.py.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoAInputError
from .files import atomic_write, exclusive

MANIFEST = "manifest.jsonl"
FOLDERS = ("images", "masks", "refs")
_MAX_TRIES = 1000


def caption_words(caption: str) -> list[str]:
    """The caption's words as the dataset validator matches class words against them."""
    return re.findall(r"[a-z0-9']+", caption.lower())


@dataclass(frozen=True)
class ExampleSubject:
    """One subject of an example: its mask in the picture and its reference photo(s)."""
    class_word: str
    mask: torch.Tensor                          # [H, W] in [0, 1], the picture's size
    references: torch.Tensor                    # [B, h, w, 3]
    reference_masks: torch.Tensor | None = None     # [B, h, w], or None (the whole photo is the subject)


def dataset_folder(output_dir: str | os.PathLike, name: str) -> Path:
    """`output_dir/name` after checking `name` is one plain folder name that stays inside it."""
    label = "dataset_name"
    text = name.strip() if isinstance(name, str) else ""
    if not text:
        raise MoAInputError(f"{label} is empty. Give a folder name such as 'my_dataset'")
    if any(c in text for c in "/\\:\0") or text in (".", "..") or os.path.isabs(text):
        raise MoAInputError(f"{label} {name!r} is not a plain folder name: path separators, ':', '.', '..' and "
                            f"absolute paths are refused. Give one folder name such as 'my_dataset'; the dataset "
                            f"is written to ComfyUI's output folder/<dataset_name>")
    root = Path(output_dir).resolve()
    folder = root / text
    if folder.resolve().parent != root:
        raise MoAInputError(f"{label} {name!r}: {folder} leads outside ComfyUI's output folder (a link?). "
                            f"Choose another name")
    return folder


def check_example(caption: str, subjects: list[ExampleSubject], image: torch.Tensor) -> None:
    """Refuse what the dataset validator would refuse: no subject, a caption without a subject's
    class word, a mask of another size than the picture."""
    if not subjects:
        raise MoAInputError("subjects: no subject given. Connect a MoA Subject chain")
    if not caption.strip():
        raise MoAInputError("caption is empty. Describe the picture, naming each subject by its class word")
    words = caption_words(caption)
    for i, s in enumerate(subjects, start=1):
        if s.class_word.lower() not in words:
            raise MoAInputError(f"caption {caption!r} lacks subject {i}'s class word '{s.class_word}'. Put the "
                                f"word '{s.class_word}' in the caption where it names the subject (e.g. 'a photo "
                                f"of a {s.class_word} ...'), or change that MoA Subject's class_word")
        if tuple(s.mask.shape) != tuple(image.shape[:2]):
            raise MoAInputError(f"subject {i} ('{s.class_word}'): mask size {s.mask.shape[-1]}x{s.mask.shape[-2]} "
                                f"differs from the picture's {image.shape[1]}x{image.shape[0]}")


def _claim(path: Path) -> bool:
    """Create `path` empty if no file has that name (atomic): the name is now this writer's."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return True
    except FileExistsError:
        return False


def _example_names(stem: str, subjects: list[ExampleSubject]) -> tuple[str, list[dict]]:
    """The example's relative file names: the image, and per subject its mask and references."""
    names = []
    for i, s in enumerate(subjects, start=1):
        word = re.sub(r"[^a-z0-9]+", "_", s.class_word.lower()).strip("_") or "subject"
        refs = [f"refs/{stem}_{i}_{word}_{j}.png" for j in range(1, s.references.shape[0] + 1)]
        entry = {"class_word": s.class_word, "mask": f"masks/{stem}_{i}_{word}.png", "references": refs}
        if s.reference_masks is not None:
            entry["reference_masks"] = [r[:-4] + "_mask.png" for r in refs]
        names.append(entry)
    return f"images/{stem}.png", names


def _files_of(image: str, names: list[dict]) -> list[str]:
    return [image, *(f for e in names for f in (e["mask"], *e["references"], *e.get("reference_masks", [])))]


def _next_number(folder: Path) -> int:
    numbers = [int(p.stem) for p in (folder / "images").glob("*.png") if p.stem.isdigit()]
    return max(numbers, default=0) + 1


def _claim_example(folder: Path, subjects: list[ExampleSubject]) -> tuple[str, list[dict]]:
    """Names for a new example, every one of them claimed (none existed before)."""
    number = _next_number(folder)
    for _ in range(_MAX_TRIES):
        image, names = _example_names(f"{number:06d}", subjects)
        claimed = []
        for rel in _files_of(image, names):
            if not _claim(folder / rel):
                break
            claimed.append(folder / rel)
        else:
            return image, names
        for path in claimed:
            path.unlink()
        number += 1
    raise MoAInputError(f"{folder}: no free example number after {_MAX_TRIES} tries. Clean up the folder")


def _save_png(path: Path, pixels: torch.Tensor) -> None:
    """An IMAGE [H, W, 3] or MASK [H, W] in [0, 1] as an 8-bit PNG, written atomically onto `path`."""
    from PIL import Image
    array = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _append_line(manifest: Path, row: dict) -> None:
    """One write on an O_APPEND descriptor: concurrent writers' lines never interleave. The lock
    keeps the check for a missing last newline and the write together, so two writers never both
    add the newline (an empty line)."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        with exclusive(fd):
            size = os.fstat(fd).st_size
            if size:                            # a hand-edited manifest may lack its last newline
                with open(manifest, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def _write_files(folder: Path, image: torch.Tensor, subjects: list[ExampleSubject], image_rel: str,
                 names: list[dict]) -> None:
    _save_png(folder / image_rel, image)
    for s, entry in zip(subjects, names):
        _save_png(folder / entry["mask"], s.mask)
        for j, rel in enumerate(entry["references"]):
            _save_png(folder / rel, s.references[j])
            if s.reference_masks is not None:
                _save_png(folder / entry["reference_masks"][j], s.reference_masks[j])


def append_example(folder: str | os.PathLike, image: torch.Tensor, caption: str,
                   subjects: list[ExampleSubject]) -> dict:
    """Write one example (picture [H, W, 3], caption, subjects) into `folder` and append its
    manifest row, which is returned (paths relative to the folder). Nothing is overwritten; on a
    failure the example's files are removed and no row is added."""
    check_example(caption, subjects, image)
    folder = Path(folder)
    for sub in FOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        if not (folder / sub).resolve().is_relative_to(folder.resolve()):
            raise MoAInputError(f"{folder / sub} leads outside the dataset folder (a link?). Remove it")
    image_rel, names = _claim_example(folder, subjects)
    try:
        _write_files(folder, image, subjects, image_rel, names)
    except BaseException:
        for rel in _files_of(image_rel, names):
            (folder / rel).unlink(missing_ok=True)
        raise
    row = {"image": image_rel, "caption": caption, "subjects": names}
    _append_line(folder / MANIFEST, row)
    return row
