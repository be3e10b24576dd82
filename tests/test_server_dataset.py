"""MoA Save Training Example through a real headless ComfyUI server: examples appended to a dataset the
trainer's validator accepts, with the masks and references the trainer reads back; a caption without
the class word and a dataset name outside the output folder refused by name; nothing overwritten."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import execution_error
from support.graphs import subject_nodes
from test_server import assert_success

NODE = "MoASaveTrainingExample"
DATASET = "server_dataset"
CAT_REGION = "dataset_cat_region.png"       # where the cat is in person.png (a test-made picture)


def save_graph(caption: str, dataset: str = DATASET, two_subjects: bool = True, picture: str = "person.png") -> dict:
    """picture -> MoA Subject chain -> MoA Save Training Example. The first subject's photo is the
    picture itself (mask from a file); the optional second is other photos of a cat, placed by a region."""
    if picture == "cat.png":
        g = subject_nodes("first", "cat.png", "cat_mask.png", "cat")
    else:
        g = subject_nodes("first", picture, "person_mask.png", "woman")
    last = "first"
    if two_subjects:
        g.update(subject_nodes("second", "cat.png", "cat_mask.png", "cat", previous=["first", 0], region=CAT_REGION))
        last = "second"
    g["save"] = {"class_type": NODE, "inputs": {"image": ["first_img", 0], "subjects": [last, 0],
                                                "caption": caption, "dataset_name": dataset}}
    return g


def pixels(path, mode: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert(mode))


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset_inputs(server_inputs):
    region = np.zeros((512, 512), np.uint8)
    region[300:420, 340:480] = 255
    Image.fromarray(region).save(server_inputs / "input" / CAT_REGION)
    return server_inputs


def test_the_node_is_listed_with_tooltips(server):
    info = server.request("/object_info")[NODE]
    assert info["display_name"] == "MoA Save Training Example" and info["category"] == "MoA"
    assert info["description"] and info["output_node"] is True and all(info["output_tooltips"])
    for name, spec in info["input"]["required"].items():
        assert len(spec) > 1 and spec[1].get("tooltip"), f"{NODE}.{name} has no tooltip"


def check_first_example(record, inputs) -> None:
    """The woman: mask = the mask file, reference = the picture cropped to the mask's box with the mask's crop;
    the cat: mask = its region, references = its own photo and mask."""
    from comfyui_moa.moa_attention.training.records import load_image, load_mask
    person, person_mask = load_image(inputs / "person.png"), load_mask(inputs / "person_mask.png")
    woman, cat = record.subjects
    assert (woman.class_word, cat.class_word) == ("woman", "cat")
    assert torch.equal(woman.mask_tensor(), person_mask)
    ys, xs = torch.nonzero(person_mask > 0.5, as_tuple=True)
    rows, cols = slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)
    (ref,), (ref_mask,) = woman.reference_tensors()
    assert torch.equal(ref, person[rows, cols]) and torch.equal(ref_mask, person_mask[rows, cols])
    assert torch.equal(cat.mask_tensor(), load_mask(inputs / CAT_REGION))
    (cat_ref,), (cat_ref_mask,) = cat.reference_tensors()
    assert torch.equal(cat_ref, load_image(inputs / "cat.png"))
    assert torch.equal(cat_ref_mask, load_mask(inputs / "cat_mask.png"))
    assert torch.equal(record.image_tensor(), person)


def run_refused(server, graph: dict, *patterns: str) -> None:
    entry = server.run(graph)
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err and err["node_type"] == NODE, entry["status"]
    for pattern in patterns:
        assert pattern in err["exception_message"], (pattern, err["exception_message"])


def test_examples_are_appended_refused_by_name_and_never_overwritten(server, dataset_inputs):
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    out, inputs = server.base / "output", dataset_inputs / "input"
    folder = out / DATASET
    first = server.run(save_graph("A woman holding a cat, in a space suit"))
    assert_success(first)
    second = server.run(save_graph("a cat sitting on a sofa", two_subjects=False, picture="cat.png"))
    assert_success(second)
    assert first["outputs"]["save"]["text"] == [f"{DATASET}/images/000001.png"]
    assert second["outputs"]["save"]["text"] == [f"{DATASET}/images/000002.png"]

    records, problems = read_dataset(folder)
    assert problems == [] and [r.caption for r in records] == ["A woman holding a cat, in a space suit",
                                                               "a cat sitting on a sofa"]
    check_first_example(records[0], inputs)
    assert torch.equal(records[1].subjects[0].mask_tensor(), torch.from_numpy(
        pixels(inputs / "cat_mask.png", "L") / np.float32(255)))
    before = folder_bytes(folder)

    run_refused(server, save_graph("a man at the beach with a cat"), "caption", "'woman'")
    run_refused(server, save_graph("a woman and her dog"), "'cat'")
    for bad in ("../escaped", "/tmp/moa_escaped", "", "a/b"):
        run_refused(server, save_graph("a woman with a cat", dataset=bad), "dataset_name")
    assert not (server.base / "escaped").exists() and not (out / "a").exists()
    assert folder_bytes(folder) == before                  # the refusals wrote nothing

    third = server.run(save_graph("a woman with a cat"))   # the server keeps serving; a third example is added
    assert_success(third)
    after = folder_bytes(folder)
    assert {k: after[k] for k in before if k != "manifest.jsonl"} == {k: v for k, v in before.items()
                                                                      if k != "manifest.jsonl"}
    assert after["manifest.jsonl"].startswith(before["manifest.jsonl"])
    rows = [json.loads(line) for line in after["manifest.jsonl"].decode().splitlines()]
    assert [r["image"] for r in rows] == [f"images/00000{i}.png" for i in (1, 2, 3)]
    assert read_dataset(folder)[1] == []
