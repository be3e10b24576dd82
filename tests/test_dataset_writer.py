"""Appending training examples (engine/dataset_writer.py, behind MoA Save Training Example): dataset
names that stay inside the output folder, rows the validator reads back, nothing ever overwritten."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_moa.moa_attention.engine import dataset_writer as dw
from comfyui_moa.moa_attention.engine.errors import MoAInputError


def picture(seed: int = 0, h: int = 24, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (h, w, 3), generator=g) / 255.0).float()


def subject(word: str = "dog", h: int = 24, w: int = 32, ref_masks: bool = True) -> dw.ExampleSubject:
    mask = torch.zeros(h, w)
    mask[4:12, 6:20] = 1.0
    refs = picture(7, 10, 12)[None]
    return dw.ExampleSubject(word, mask, refs, torch.ones(1, 10, 12) if ref_masks else None)


@pytest.mark.parametrize("name", ["", "   ", "a/b", "..", ".", "../x", "a\\b", "/tmp/x", "C:x", "x\0"])
def test_names_that_are_not_one_plain_folder_are_refused(tmp_path, name):
    with pytest.raises(MoAInputError, match="dataset_name"):
        dw.dataset_folder(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_a_name_linking_outside_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(MoAInputError, match="outside ComfyUI's output folder"):
        dw.dataset_folder(tmp_path / "out", "link")
    assert dw.dataset_folder(tmp_path / "out", " my_set ") == (tmp_path / "out" / "my_set").resolve()


def test_appended_examples_read_back_through_the_validator(tmp_path, pack):
    from comfyui_moa.moa_attention.training.dataset import read_manifest
    folder = tmp_path / "set"
    first = dw.append_example(folder, picture(1), "a dog on grass", [subject()])
    second = dw.append_example(folder, picture(2), "a Dog and a cat", [subject(), subject("cat", ref_masks=False)])
    assert first["image"] == "images/000001.png" and second["image"] == "images/000002.png"
    records, problems = read_manifest(folder)
    assert problems == [] and len(records) == 2
    assert [s.class_word for s in records[1].subjects] == ["dog", "cat"]
    assert records[1].subjects[1].reference_masks is None
    saved = np.asarray(Image.open(folder / first["image"]))
    assert np.array_equal(saved, (picture(1) * 255).round().byte().numpy())
    mask = np.asarray(Image.open(folder / first["subjects"][0]["mask"]))
    assert np.array_equal(mask > 127, subject().mask.numpy() > 0.5) and set(np.unique(mask)) == {0, 255}
    assert not list(folder.rglob("*.tmp"))


def test_existing_files_are_never_overwritten(tmp_path):
    folder = tmp_path / "set"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "000001_1_dog.png").write_bytes(b"someone else's file")   # takes number 1 for masks
    row = dw.append_example(folder, picture(), "a dog", [subject()])
    assert row["image"] == "images/000002.png"
    assert (folder / "masks" / "000001_1_dog.png").read_bytes() == b"someone else's file"
    assert not (folder / "images" / "000001.png").exists()         # the claim on number 1 was released


def test_refusals_write_nothing(tmp_path):
    folder = tmp_path / "set"
    with pytest.raises(MoAInputError, match="lacks subject 1's class word 'dog'"):
        dw.append_example(folder, picture(), "a cat on grass", [subject()])
    with pytest.raises(MoAInputError, match="mask size 8x8 differs"):
        dw.append_example(folder, picture(), "a dog", [dw.ExampleSubject("dog", torch.ones(8, 8), picture()[None])])
    with pytest.raises(MoAInputError, match="no subject"):
        dw.append_example(folder, picture(), "a dog", [])
    assert not folder.exists()


def test_a_failed_write_leaves_no_files_and_no_row(tmp_path):
    folder = tmp_path / "set"
    dw.append_example(folder, picture(), "a dog", [subject()])
    before = (folder / "manifest.jsonl").read_bytes()
    broken = dw.ExampleSubject("dog", subject().mask, torch.zeros(1, 10, 12, 5))    # 5 channels: PIL refuses
    with pytest.raises(Exception):
        dw.append_example(folder, picture(), "a dog", [broken])
    assert (folder / "manifest.jsonl").read_bytes() == before
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["000001.png"]


def test_concurrent_writers_get_distinct_examples_and_whole_lines(tmp_path):
    folder = tmp_path / "set"
    (folder / "manifest.jsonl").parent.mkdir()
    (folder / "manifest.jsonl").write_text('{"image": "x.png"}')              # a last line without newline
    rows, errors = [], []

    def write(i: int) -> None:
        try:
            rows.append(dw.append_example(folder, picture(i), "a dog", [subject()]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert len({r["image"] for r in rows}) == 6
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(l)["image"] for l in lines[1:]] and len(lines) == 7
    assert sorted(json.loads(l)["image"] for l in lines[1:]) == sorted(r["image"] for r in rows)
