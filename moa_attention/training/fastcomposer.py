"""FastComposer's dataset layout, read as it is downloaded (FFHQ-wide, the data MoA trained on).

    ROOT/image_ids.txt, image_ids_train.txt, image_ids_test.txt    one image id per line
    ROOT/<id[:5]>/<id>.jpg    the image
    ROOT/<id[:5]>/<id>.json   {"caption": ..., "segments": [{"id", "bbox", "end", "coco_label"}, ...]}
    ROOT/<id[:5]>/<id>.npy    integer segment map, pixel = segment id

A segment of a chosen coco_label is a subject: its class word is the head (last word) of the
noun phrase ending at character `end` of the caption, its mask is `map == id`, its reference is
the subject cut out onto a white background and cropped to `bbox` (FastComposer's reference;
with light augmentation when training). `bbox` is indexed as FastComposer's loader does:
[h1, w1, h2, w2] crops rows w1:w2 and columns h1:h2. Segment maps are read with numpy's
allow_pickle=False: a dataset file is never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine.errors import MoAInputError
from ..engine.subject_images import BACKGROUND
from .records import Problem, Record, SubjectRecord, image_size, load_image, mask_from_array

IDS_FILES = {"all": "image_ids.txt", "train": "image_ids_train.txt", "test": "image_ids_test.txt"}
SPLITS = tuple(IDS_FILES)
WordIds = Callable[[str], tuple]


def is_fastcomposer(root: str | Path) -> bool:
    """A folder in FastComposer's layout: it has one of its image-id lists."""
    return any((Path(root) / name).is_file() for name in IDS_FILES.values())


def load_segmap(path: Path, header_only: bool = False) -> np.ndarray:
    """[H, W] integer segment map; never unpickles (an object array is refused). header_only maps
    the file instead of reading it (its shape and type, for a quick check)."""
    seg = np.load(path, allow_pickle=False, mmap_mode="r" if header_only else None)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer array, got {seg.ndim}-D {seg.dtype}")
    return seg


def cut_out(image: torch.Tensor, keep: torch.Tensor, bbox: tuple[int, int, int, int]) -> torch.Tensor:
    """[h, w, 3] the subject (`keep` [H, W] bool) on a white background, cropped to the box."""
    h1, w1, h2, w2 = bbox
    plain = torch.where(keep[..., None], image, torch.full_like(image, BACKGROUND))
    return plain[w1:w2, h1:h2]


def augment(reference: torch.Tensor, key: str) -> torch.Tensor:
    """Light, repeatable augmentation of a cut-out: a random crop keeping 85-100 % of each side,
    then a horizontal flip half of the time (seeded by `key`, so the encoder cache stays valid)."""
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
    h, w = reference.shape[:2]
    ch, cw = max(1, round(h * rng.uniform(0.85, 1.0))), max(1, round(w * rng.uniform(0.85, 1.0)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = reference[y:y + ch, x:x + cw]
    return out.flip(1) if rng.random() < 0.5 else out


@dataclass
class FastComposerSubject(SubjectRecord):
    """mask: the segment map (.npy); references: [the image]; the subject is segment `segment_id`."""
    segment_id: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    augmented: bool = False

    def keep(self) -> np.ndarray:
        keep = load_segmap(self.mask) == self.segment_id
        if not keep.any():
            raise MoAInputError(f"segment {self.segment_id} is not in the segment map {self.mask}; list every such "
                                f"problem with python -m moa_attention.training.dataset {self.mask.parents[1]}")
        return keep

    def mask_tensor(self, size: int | None = None) -> torch.Tensor:
        return mask_from_array(self.keep(), size)

    def reference_tensors(self) -> tuple[list[torch.Tensor], None]:
        ref = cut_out(load_image(self.references[0]), torch.from_numpy(self.keep()), self.bbox)
        return [augment(ref, self.cache_tag()) if self.augmented else ref], None

    def cache_tag(self) -> str:
        return f"{self.references[0].stem}#{self.segment_id}:{self.class_word}:{self.bbox}:{self.augmented}"


@dataclass
class FastComposerRecord(Record):
    image_id: str = ""
    info: Path = field(default_factory=Path)

    @property
    def where(self) -> str:
        return f"id {self.image_id}"

    def cache_files(self) -> list[Path]:
        return [*super().cache_files(), self.info]


def head_word(caption: str, end: object) -> tuple[str | None, str | None]:
    """(the last word of caption[:end], None) or (None, why not)."""
    if not isinstance(end, int) or isinstance(end, bool) or not 0 < end <= len(caption):
        return None, f"end {end!r} outside the caption (length {len(caption)})"
    m = re.search(r"(\w+)\s*$", caption[:end])
    if m is None or (end < len(caption) and m.end(1) == end and re.match(r"\w", caption[end])):
        return None, f"end {end} does not close a word in {caption!r}"
    return m.group(1).lower(), None


@dataclass
class _IdCheck:
    """The checks of one image id; every problem is kept, each naming the id and the file."""
    root: Path
    line: int
    image_id: str
    labels: tuple[str, ...]
    word_ids: WordIds
    thorough: bool = True                 # read every segment map (else its header: the trainer's quick start)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problems.append(Problem(self.line, message, where=f"id {self.image_id}"))

    def path(self, ext: str) -> Path:
        return self.root / self.image_id[:5] / f"{self.image_id}{ext}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def read(self, ext: str, reader: Callable[[Path], object]) -> object | None:
        path = self.path(ext)
        if not path.is_file():
            self.problem(f"missing file {self.rel(path)}")
            return None
        try:
            return reader(path)
        except Exception as e:  # noqa: BLE001 (PIL, numpy and json raise many types for a bad file)
            self.problem(f"unreadable file {self.rel(path)} ({type(e).__name__}: {e})")
            return None

    def info(self) -> tuple[str, list] | None:
        info = self.read(".json", lambda p: json.loads(p.read_text()))
        if info is None:
            return None
        caption, segments = (info.get("caption"), info.get("segments")) if isinstance(info, dict) else (None, None)
        if not isinstance(caption, str) or not isinstance(segments, list):
            self.problem(f"{self.rel(self.path('.json'))}: expected an object with a caption string and a "
                         f"segments list")
            return None
        return caption, segments

    def record(self, max_subjects: int, augmented: bool) -> FastComposerRecord | None:
        info = self.info()
        size = self.read(".jpg", image_size)
        seg = self.read(".npy", lambda p: load_segmap(p, header_only=not self.thorough))
        if size is not None and seg is not None and seg.shape != (size[1], size[0]):
            self.problem(f"image {self.rel(self.path('.jpg'))} is {size[0]}x{size[1]} but segment map "
                         f"{self.rel(self.path('.npy'))} is {seg.shape[1]}x{seg.shape[0]}")
        if info is None:
            return None
        chosen = [s for s in info[1] if not isinstance(s, dict) or s.get("coco_label") in self.labels]
        ids = set(np.unique(seg).tolist()) if seg is not None and self.thorough else None
        subjects = [self.subject(s, info[0], ids, size, augmented) for s in chosen]
        if self.problems or not subjects:
            return None
        subjects = sorted(subjects, key=lambda s: s[0])[:max_subjects]
        return FastComposerRecord(self.line, self.path(".jpg"), info[0], [s for _, s in subjects],
                                  image_id=self.image_id, info=self.path(".json"))

    def subject(self, s: object, caption: str, ids: set | None, size: tuple | None,
                augmented: bool) -> tuple[int, FastComposerSubject] | None:
        npy = self.rel(self.path(".npy"))
        if not isinstance(s, dict) or not isinstance(s.get("id"), int):
            self.problem(f"{self.rel(self.path('.json'))}: segment {s!r} has no integer id")
            return None
        label = f"segment {s['id']} ({s.get('coco_label')})"
        if ids is not None and s["id"] not in ids:
            self.problem(f"{label}: id {s['id']} not in the segment map {npy}")
        word, why = head_word(caption, s.get("end"))
        if why:
            self.problem(f"{label}: {why} ({self.rel(self.path('.json'))})")
        elif len(tokens := self.word_ids(word)) != 1:
            self.problem(f"{label}: head word '{word}' of its phrase is {len(tokens)} CLIP tokens, "
                         f"the trainer binds one ({self.rel(self.path('.json'))}); use a one-token class word")
        bbox = self.bbox(label, s.get("bbox"), size)
        if self.problems:
            return None
        return s["end"], FastComposerSubject(word, self.path(".npy"), [self.path(".jpg")], None,
                                             segment_id=s["id"], bbox=bbox, augmented=augmented)

    def bbox(self, label: str, box: object, size: tuple | None) -> tuple[int, int, int, int] | None:
        """[h1, w1, h2, w2] as FastComposer crops it (columns h1:h2, rows w1:w2), inside the image."""
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
        if ok and size is not None:
            h1, w1, h2, w2 = box
            ok = 0 <= h1 < h2 <= size[0] and 0 <= w1 < w2 <= size[1]
        if not ok:
            self.problem(f"{label}: bbox {box!r} is not [h1, w1, h2, w2] inside the image "
                         f"({self.rel(self.path('.json'))})")
            return None
        return tuple(box)


def read_ids(root: Path, split: str) -> tuple[list[str], list[Problem]]:
    path = root / IDS_FILES[split]
    if not path.is_file():
        others = [f"--split {k} ({v})" for k, v in IDS_FILES.items() if (root / v).is_file()]
        return [], [Problem(0, f"no {path.name} in {root} for --split {split}; this folder has "
                               f"{', '.join(others) or 'no id list'}")]
    return [line.strip() for line in path.read_text().splitlines()], []


def read_fastcomposer(root: str | Path, split: str = "train", coco_labels: tuple[str, ...] = ("person",),
                      max_subjects: int = 4, augmented: bool = False, thorough: bool = True,
                      word_ids: WordIds | None = None) -> tuple[list[FastComposerRecord], list[Problem]]:
    """Every good image with at least one subject of `coco_labels` (up to `max_subjects`, in
    caption order) and every problem. `word_ids`: a word's CLIP token ids (default: ComfyUI's
    SD1.5 tokenizer, ComfyUI started). thorough=False reads only the segment maps' headers, so a
    segment id missing from its map is found when the trainer encodes that image."""
    if word_ids is None:
        from ..comfyui.prompt import sd15_word_ids
        word_ids = sd15_word_ids
    root = Path(root)
    ids, problems = read_ids(root, split)
    records = []
    for line, image_id in enumerate(ids, start=1):
        if not image_id:
            continue
        check = _IdCheck(root, line, image_id, tuple(coco_labels), word_ids, thorough)
        record = check.record(max_subjects, augmented)
        problems += check.problems
        if record is not None:
            records.append(record)
    if not records and not problems:
        problems.append(Problem(0, f"no image in {root / IDS_FILES[split]} has a segment labelled "
                                   f"{', '.join(coco_labels)}"))
    return records, problems
