"""The trainer's dataset: a folder with `manifest.jsonl`, one training image per line.

    {"image": "images/0001.png",
     "caption": "a man and a dog in a park",
     "subjects": [
        {"class_word": "man", "mask": "masks/0001_man.png", "references": ["refs/0001_man_a.png"]},
        {"class_word": "dog", "mask": "masks/0001_dog.png", "references": ["refs/0001_dog.png"],
         "reference_masks": ["refs/0001_dog_mask.png"]}]}

Paths are relative to the folder. `mask` is the subject's segmentation in `image` (white =
subject, same size as the image). `references` are photos of the same subject (crops of this
image or other photos of it); `reference_masks`, optional, remove their background.
ComfyUI's MoA Save Training Example node appends rows to this layout (engine/dataset_writer.py).

`python -m moa_attention.training.dataset DIR` checks every row and lists every problem with its line
number before any training starts. A folder in FastComposer's layout is read by fastcomposer.py
(its problems name the image id and the file).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..comfyui.bootstrap import start_comfyui
from ..engine.dataset_writer import MANIFEST, caption_words
from ..engine.files import read_json_lines
from .fastcomposer import SPLITS, is_fastcomposer, read_fastcomposer
from .records import Problem, Record, SubjectRecord, image_size, load_image, load_mask  # noqa: F401 (re-exported)


def _check_file(root: Path, rel: object, what: str, line: int, problems: list[Problem]) -> tuple[Path, tuple] | None:
    if not isinstance(rel, str) or not rel:
        problems.append(Problem(line, f"{what}: expected a relative file path, got {rel!r}"))
        return None
    path = root / rel
    if not path.is_file():
        problems.append(Problem(line, f"{what}: missing file {rel}"))
        return None
    try:
        return path, image_size(path)
    except Exception as e:  # noqa: BLE001 (PIL raises many types for a bad file)
        problems.append(Problem(line, f"{what}: unreadable image {rel} ({type(e).__name__}: {e})"))
        return None


def read_manifest(root: str | Path) -> tuple[list[Record], list[Problem]]:
    """Every valid record and every problem (a row with any problem is not a record)."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        return [], [Problem(0, f"no {MANIFEST} in {root}")]
    records, problems = [], []
    for row in read_json_lines(manifest):
        if row.value is None:
            problems.append(Problem(row.line, row.problem))
            continue
        check = _RowCheck(root, row.line)
        record = check.record(row.value)
        problems += check.problems
        if record is not None:
            records.append(record)
    if not records and not problems:
        problems.append(Problem(0, f"{MANIFEST} has no rows"))
    return records, problems


@dataclass
class _RowCheck:
    """The checks of one manifest row; every problem found is kept, not only the first."""
    root: Path
    line: int
    problems: list[Problem] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problems.append(Problem(self.line, message))

    def file(self, rel: object, what: str) -> tuple[Path, tuple] | None:
        return _check_file(self.root, rel, what, self.line, self.problems)

    def record(self, row: dict) -> Record | None:
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            self.problem("caption: missing or empty")
            caption = ""
        image = self.file(row.get("image"), "image")
        subjects_raw = row.get("subjects")
        if not isinstance(subjects_raw, list) or not subjects_raw:
            self.problem("subjects: expected a non-empty list")
            subjects_raw = []
        subjects = [self.subject(f"subject {i}", s, caption, image) for i, s in enumerate(subjects_raw, start=1)]
        if self.problems or image is None:
            return None
        return Record(self.line, image[0], caption, subjects)

    def subject(self, label: str, s: object, caption: str, image: tuple | None) -> SubjectRecord | None:
        if not isinstance(s, dict):
            self.problem(f"{label}: expected an object")
            return None
        word = s.get("class_word")
        if not isinstance(word, str) or not word.strip():
            self.problem(f"{label}: class_word missing")
        elif word.lower() not in caption_words(caption):
            self.problem(f"{label}: class word '{word}' not in caption {caption!r}")
        mask = self.file(s.get("mask"), f"{label} mask")
        if mask and image and mask[1] != image[1]:
            self.problem(f"{label} mask: size {mask[1][0]}x{mask[1][1]} differs from image size "
                         f"{image[1][0]}x{image[1][1]}")
        refs, ref_masks = self.references(label, s)
        if mask and all(refs) and (ref_masks is None or all(ref_masks)):
            return SubjectRecord(word, mask[0], [r[0] for r in refs], [m[0] for m in ref_masks] if ref_masks else None)
        return None

    def references(self, label: str, s: dict) -> tuple[list, list | None]:
        """The subject's reference photos and, when given, one mask per photo of the same size."""
        refs_raw = s.get("references")
        if not isinstance(refs_raw, list) or not refs_raw:
            self.problem(f"{label}: references must be a non-empty list of files")
            refs_raw = []
        refs = [self.file(r, f"{label} reference") for r in refs_raw]
        masks_raw = s.get("reference_masks")
        if masks_raw is None:
            return refs, None
        if not isinstance(masks_raw, list) or len(masks_raw) != len(refs_raw):
            self.problem(f"{label}: reference_masks must list one mask per reference")
            return refs, None
        masks = [self.file(r, f"{label} reference mask") for r in masks_raw]
        for ref, rm in zip(refs, masks):
            if ref and rm and ref[1] != rm[1]:
                self.problem(f"{label} reference mask: size differs from its reference ({rm[1]} vs {ref[1]})")
        return refs, masks


def read_dataset(root: str | Path, split: str = "train", coco_labels: tuple[str, ...] = ("person",),
                 max_subjects: int = 4, augmented: bool = False,
                 thorough: bool = True) -> tuple[list[Record], list[Problem]]:
    """Records and problems of a dataset folder in either layout: FastComposer's (found by its
    image-id lists; `split`, `coco_labels`, `max_subjects` and `thorough` apply to it, and
    ComfyUI must be started for its tokenizer) or the manifest."""
    if is_fastcomposer(root):
        if max_subjects < 1:
            return [], [Problem(0, f"--max-subjects must be at least 1, got {max_subjects}")]
        return read_fastcomposer(root, split, tuple(coco_labels), max_subjects, augmented, thorough)
    return read_manifest(root)


def add_data_options(p: argparse.ArgumentParser, split: str = "train", coco_labels: tuple = ("person",),
                     max_subjects: int = 4) -> None:
    """The options of a FastComposer-layout folder, shared by the trainer and the validator."""
    p.add_argument("--split", choices=SPLITS, default=split,
                   help="FastComposer layout: which image-id list (image_ids_<split>.txt; all: image_ids.txt)")
    p.add_argument("--coco-labels", nargs="+", default=list(coco_labels), metavar="LABEL",
                   help="FastComposer layout: the segments' coco_label values that are subjects")
    p.add_argument("--max-subjects", type=int, default=max_subjects,
                   help="FastComposer layout: subjects per image at most (the first ones in the caption)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_attention.training.dataset",
                                     description="Check a MoA training dataset and list every bad row.")
    parser.add_argument("folder", help=f"dataset folder: {MANIFEST}, or FastComposer's layout (image_ids*.txt)")
    add_data_options(parser)
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (its SD1.5 tokenizer checks "
                                                                   "FastComposer class words)")
    args = parser.parse_args(argv)
    if is_fastcomposer(args.folder):
        start_comfyui(args.comfyui, cpu=True)
    records, problems = read_dataset(args.folder, args.split, tuple(args.coco_labels), args.max_subjects)
    for p in problems:
        print(p)
    print(f"{len(records)} good row(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
