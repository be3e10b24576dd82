"""FastComposer's dataset layout: read, validated (each bad image reported by id and file) and
trained on, on a small folder written here; the class words, masks and references the trainer
builds are checked against what the test wrote."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.waits import minutes
from test_trainer import run_in_process, train_args

ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48                     # images wider than tall: the box's two axes cannot be swapped unnoticed

TWO = "a young woman and a tall man with their dog on a beach"
GOOD = {   # id -> (caption, [(segment id, coco_label, phrase's last word, bbox [h1, w1, h2, w2] = x1, y1, x2, y2)])
    "0000100001": (TWO, [(1, "person", "woman", [4, 6, 24, 44]), (2, "person", "man", [30, 2, 50, 40]),
                         (3, "dog", "dog", [52, 30, 62, 46])]),
    "0000100002": ("a girl reading in a park", [(1, "person", "girl", [20, 10, 44, 46])]),
}


def _scene(rng: np.random.Generator, segments: list) -> tuple[np.ndarray, np.ndarray]:
    """An image and its segment map: each segment an ellipse filling its box, in its own colour."""
    image = np.zeros((H, W, 3), np.float32) + rng.integers(40, 200, 3)
    seg = np.zeros((H, W), np.int32)
    yy, xx = np.mgrid[:H, :W]
    for i, (sid, _, _, (x1, y1, x2, y2)) in enumerate(segments):
        cx, cy, rx, ry = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        seg[inside] = sid
        image[inside] = [(230, 40, 40), (40, 200, 60), (40, 60, 220)][i % 3]
    return image.clip(0, 255).astype(np.uint8), seg


def _write(root: Path, image_id: str, caption: str, segments: list, seed: int) -> tuple[Path, np.ndarray]:
    """One jpg/json/npy triple; `end` of each segment = the end of its phrase's last word."""
    folder = root / image_id[:5]
    folder.mkdir(parents=True, exist_ok=True)
    image, seg = _scene(np.random.default_rng(seed), segments)
    Image.fromarray(image).save(folder / f"{image_id}.jpg", quality=95)
    np.save(folder / f"{image_id}.npy", seg)
    info = {"caption": caption, "segments": [
        {"id": sid, "coco_label": label, "bbox": box, "end": re.search(rf"\b{word}\b", caption).end()}
        for sid, label, word, box in segments]}
    (folder / f"{image_id}.json").write_text(json.dumps(info))
    return folder, seg


def _bad_rows(root: Path) -> dict[str, str]:
    """One image per kind of problem -> the words its report must hold."""
    one = [(1, "person", "man", [10, 5, 40, 45])]
    bad = {}
    folder, _ = _write(root, "0000200003", "a man at work", one, 3)
    (folder / "0000200003.npy").unlink()
    bad["0000200003"] = "missing file 00002/0000200003.npy"
    folder, _ = _write(root, "0000200004", "a man at work", one, 4)
    info = json.loads((folder / "0000200004.json").read_text())
    info["segments"][0]["id"] = 7
    (folder / "0000200004.json").write_text(json.dumps(info))
    bad["0000200004"] = "segment 7 (person): id 7 not in the segment map 00002/0000200004.npy"
    folder, _ = _write(root, "0000200005", "a man at work", one, 5)
    info["segments"][0].update(id=1, end=200)
    (folder / "0000200005.json").write_text(json.dumps(info))
    bad["0000200005"] = "end 200 outside the caption (length 13)"
    _write(root, "0000200006", "a photo of a xyzzyqq", [(1, "person", "xyzzyqq", [10, 5, 40, 45])], 6)
    bad["0000200006"] = "head word 'xyzzyqq' of its phrase is 4 CLIP tokens"
    folder, seg = _write(root, "0000200007", "a man at work", one, 7)
    np.save(folder / "0000200007.npy", seg[:-8])
    bad["0000200007"] = "image 00002/0000200007.jpg is 64x48 but segment map 00002/0000200007.npy is 64x40"
    folder, _ = _write(root, "0000200008", "a man at work", one, 8)
    (folder / "0000200008.jpg").write_bytes(b"not a jpeg")
    bad["0000200008"] = "unreadable file 00002/0000200008.jpg"
    folder, _ = _write(root, "0000200009", "a man at work", one, 9)
    np.save(folder / "0000200009.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    bad["0000200009"] = "unreadable file 00002/0000200009.npy (ValueError"     # never unpickled
    return bad


@pytest.fixture(scope="module")
def fc_data(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("ffhq_wide")
    maps = {image_id: _write(root, image_id, caption, segs, seed)[1]
            for seed, (image_id, (caption, segs)) in enumerate(GOOD.items())}
    bad = _bad_rows(root)
    (root / "image_ids_train.txt").write_text("\n".join(GOOD) + "\n")
    (root / "image_ids_test.txt").write_text("0000100002\n")
    (root / "image_ids.txt").write_text("\n".join([*GOOD, *bad]) + "\n")
    return root, maps, bad


def _cut_out(root: Path, image_id: str, seg: np.ndarray, sid: int, box: list) -> np.ndarray:
    """The reference as FastComposer makes it: the subject on white, rows y1:y2 and columns x1:x2."""
    image = np.asarray(Image.open(root / image_id[:5] / f"{image_id}.jpg").convert("RGB"), np.float32) / 255
    x1, y1, x2, y2 = box
    return np.where((seg == sid)[..., None], image, 1.0)[y1:y2, x1:x2]


def test_each_bad_image_is_reported_by_id_and_file(fc_data, comfy):
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    root, _, bad = fc_data
    records, problems = read_dataset(root, split="all")
    assert sorted(r.image_id for r in records) == sorted(GOOD)
    by_id: dict[str, list[str]] = {}
    for p in problems:
        by_id.setdefault(p.where, []).append(p.message)
    assert sorted(by_id) == sorted(f"id {i}" for i in bad), problems
    for image_id, words in bad.items():
        assert any(words in m for m in by_id[f"id {image_id}"]), (image_id, by_id[f"id {image_id}"])
    assert any(str(p).startswith("id 0000200007: image 00002/0000200007.jpg is 64x48") for p in problems), problems


def test_the_trainers_quick_read_finds_a_missing_segment_when_it_encodes(fc_data, comfy):
    """The trainer reads only the maps' headers at start; a segment id missing from its map stops
    the encoding of that image, naming the segment and the file."""
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    root, _, bad = fc_data
    records, problems = read_dataset(root, split="all", thorough=False)
    assert sorted(p.where for p in problems) == sorted(f"id {i}" for i in bad if i != "0000200004")
    (missing,) = [r for r in records if r.image_id == "0000200004"]
    with pytest.raises(MoAInputError, match=r"segment 7 is not in the segment map .*0000200004\.npy"):
        missing.subjects[0].mask_tensor(8)


def test_class_words_masks_and_references_are_what_the_folder_says(fc_data, comfy):
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    root, maps, _ = fc_data
    records, problems = read_dataset(root, split="train", coco_labels=("person",))
    assert problems == []
    two = next(r for r in records if r.image_id == "0000100001")
    assert two.caption == TWO and [s.class_word for s in two.subjects] == ["woman", "man"]   # not the dog
    for s, (sid, _, _, box) in zip(two.subjects, GOOD["0000100001"][1]):
        mask = s.mask_tensor()
        assert mask.shape == (H, W) and torch.equal(mask, torch.from_numpy(maps[two.image_id] == sid).float())
        (ref,), ref_masks = s.reference_tensors()
        assert ref_masks is None
        expected = _cut_out(root, two.image_id, maps[two.image_id], sid, box)
        assert ref.shape == expected.shape == (box[3] - box[1], box[2] - box[0], 3)
        assert np.abs(ref.numpy() - expected).max() < 1e-6
    assert [s.class_word for s in read_dataset(root, "train", ("person", "dog"))[0][0].subjects] == \
        ["woman", "man", "dog"]
    assert [s.class_word for s in read_dataset(root, "train", ("person", "dog"), max_subjects=1)[0][0].subjects] == \
        ["woman"]
    assert [r.image_id for r in read_dataset(root, "test")[0]] == ["0000100002"]


def _is_crop_of(small: np.ndarray, big: np.ndarray) -> bool:
    h, w = small.shape[:2]
    return any(np.abs(cand[y:y + h, x:x + w] - small).max() < 1e-6
               for cand in (big, big[:, ::-1]) for y in range(big.shape[0] - h + 1) for x in range(big.shape[1] - w + 1))


def test_training_references_are_lightly_augmented_cut_outs(fc_data, comfy):
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    root, maps, _ = fc_data
    records, _ = read_dataset(root, split="train", augmented=True)
    shapes = []
    for rec in records:
        for s, (sid, _, _, box) in zip(rec.subjects, GOOD[rec.image_id][1]):
            (ref,), _ = s.reference_tensors()
            full = _cut_out(root, rec.image_id, maps[rec.image_id], sid, box)
            assert 0.85 * full.shape[0] - 1 <= ref.shape[0] <= full.shape[0], (ref.shape, full.shape)
            assert 0.85 * full.shape[1] - 1 <= ref.shape[1] <= full.shape[1], (ref.shape, full.shape)
            assert _is_crop_of(ref.numpy(), full)
            assert torch.equal(ref, s.reference_tensors()[0][0])        # repeatable: the encoder cache holds
            shapes.append((tuple(ref.shape), full.shape))
    assert any(r != f for r, f in shapes), shapes


def test_the_validator_command_lists_fastcomposer_problems(fc_data):
    root, _, bad = fc_data
    cmd = [sys.executable, "-m", "moa_attention.training.dataset", str(root), "--split", "all",
           "--comfyui", str(ROOT / ".dev" / "ComfyUI")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=minutes(5))
    assert proc.returncode == 1, proc.stderr
    for image_id, words in bad.items():
        assert f"id {image_id}: " in proc.stdout and words in proc.stdout, (image_id, proc.stdout)
    assert f"{len(GOOD)} good row(s), {len(bad)} problem(s)" in proc.stdout


@pytest.fixture(scope="module")
def fc_env(models_base, fc_data, tmp_path_factory):
    base, info = models_base
    cache = tmp_path_factory.mktemp("fc_encoded_cache")
    return {"base": base, "ckpt": info["checkpoint_path"], "clip_vision": info["clip_vision_path"],
            "data": fc_data[0], "cache": cache}


def test_the_trainer_trains_on_the_folder_and_encodes_what_it_says(fc_env, fc_data, tmp_path, monkeypatch, comfy):
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.training.cache import load_example
    from comfyui_moa.moa_attention.training.records import mask_from_array
    monkeypatch.setenv("MOA_CACHE_DIR", str(fc_env["cache"]))
    with pytest.raises(MoAInputError, match=r"6 problem\(s\)(.|\n)*id 0000200003: missing file"):
        run_in_process(train_args(fc_env, tmp_path / "refused", "--split", "all"))
    out = tmp_path / "run"
    assert run_in_process(train_args(fc_env, out, "--steps", "2", "--eval-examples", "2")) == 0
    assert (out / "adapter.safetensors").is_file()
    cached = sorted((fc_env["cache"] / "encoded").glob("*.safetensors"))      # one file per example
    examples = {e.caption: e for e in map(load_example, cached)}
    assert len(cached) == len(examples)
    assert sorted(examples) == sorted(c for c, _ in GOOD.values())
    _, maps, _ = fc_data
    for image_id, (caption, segments) in GOOD.items():
        e = examples[caption]
        people = [sid for sid, label, _, _ in segments if label == "person"]
        want = torch.stack([mask_from_array(maps[image_id] == sid, 8) for sid in people])
        assert torch.equal(e.masks, want), image_id
        assert len(e.positions) == len(e.features) == len(people)
    woman, man = examples[TWO].positions
    assert woman == [3] and man == [7]        # <start> a young woman and a tall man: one token each
