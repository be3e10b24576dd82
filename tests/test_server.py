"""End to end through a real headless ComfyUI server with the pack in custom_nodes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from support.graphs import ADAPTER, base_graph, moa_graph
from conftest import execution_error

PROMPT = "a photo of a man at the beach"


def images_of(server, entry: dict, node: str) -> list[np.ndarray]:
    out = []
    for img in entry["outputs"][node]["images"]:
        path = server.base / "output" / img["subfolder"] / img["filename"]
        out.append(np.asarray(Image.open(path)))
    return out


def assert_success(entry: dict) -> None:
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "success", f"execution failed: {err}"


def test_classic_graph_runs_and_object_info_lists_the_pack(server, server_inputs):
    entry = server.run(base_graph())
    assert_success(entry)
    (img,) = images_of(server, entry, "save")
    assert img.shape == (64, 64, 3)

    info = server.request("/object_info")
    for node, display in [("MoAAdapterLoader", "MoA Adapter Loader"), ("MoASubject", "MoA Subject"),
                          ("MoAApply", "MoA Apply"), ("MoARouterMaps", "MoA Router Maps")]:
        assert node in info, f"{node} not registered"
        assert info[node]["display_name"] == display
        assert info[node]["category"] == "MoA"
        assert info[node]["description"]
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert ADAPTER in info["MoAAdapterLoader"]["input"]["required"]["adapter_name"][0]
    page = server.request("/")
    assert b"<html" in page.lower() if isinstance(page, bytes) else True


def test_one_subject_samples_and_router_maps_have_the_image_shape(server, server_inputs):
    g = moa_graph(ADAPTER, [{"image": "person.png", "mask": "person_mask.png", "word": "man"}], PROMPT)
    entry = server.run(g)
    assert_success(entry)
    (img,) = images_of(server, entry, "save")
    (overlay,) = images_of(server, entry, "save_maps")
    (mask,) = images_of(server, entry, "save_mask")
    assert img.shape == overlay.shape == mask.shape == (64, 64, 3)
    share = mask[..., 0] / 255.0
    # the router's share is ~softmax([0, 0.5]) = 0.62 for an untrained-looking adapter
    assert 0.3 < share.mean() < 0.9


def test_two_subjects_and_hard_routing(server, server_inputs):
    subjects = [{"image": "person.png", "mask": "person_mask.png", "word": "man"},
                {"image": "cat.png", "mask": "cat_mask.png", "word": "cat"}]
    for routing in ("soft", "hard"):
        entry = server.run(moa_graph(ADAPTER, subjects, "a man hugging a cat in a garden", routing=routing))
        assert_success(entry)
        (mask,) = images_of(server, entry, "save_mask")
        assert mask.shape == (64, 64, 3)


def test_strength_zero_gives_the_same_image_as_no_moa(server, server_inputs):
    plain = server.run(base_graph(PROMPT, seed=11))
    assert_success(plain)
    g = moa_graph(ADAPTER, [{"image": "person.png", "mask": "person_mask.png", "word": "man"}], PROMPT,
                  strength=0.0, seed=11, maps=False)
    moa = server.run(g)
    assert_success(moa)
    (a,), (b,) = images_of(server, plain, "save"), images_of(server, moa, "save")
    assert np.array_equal(a, b)
    g["apply"]["inputs"]["strength"] = 1.0
    on = server.run(g)
    assert_success(on)
    (c,) = images_of(server, on, "save")
    assert not np.array_equal(a, c), "strength 1 must change the picture"


ONE = [{"image": "person.png", "mask": "person_mask.png", "word": "man"}]


def _bad(name):
    g = moa_graph(ADAPTER, ONE, PROMPT, maps=False)
    if name == "word not in prompt":
        g["subject0"]["inputs"]["class_word"] = "giraffe"
        return g, r"class word 'giraffe' is not in the prompt.*tokens are: \['a', 'photo', 'of', 'a', 'man'"
    if name == "more subjects than words":
        g = moa_graph(ADAPTER, ONE * 2, PROMPT, maps=False)
        return g, r"2 subjects use the class word 'man' but the prompt names it only 1 time"
    if name == "mask size differs":
        g["subject0_mask"]["inputs"]["image"] = "cat_mask.png"
        return g, r"mask size 451x300 differs from image size 512x512"
    if name == "empty mask":
        g["subject0_mask"]["inputs"]["image"] = "empty_mask.png"
        return g, r"mask 1 of 1 is empty"
    if name == "batch lengths differ":
        g["rep_img"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["subject0_img", 0], "amount": 2}}
        g["mask_img"] = {"class_type": "MaskToImage", "inputs": {"mask": ["subject0_mask", 0]}}
        g["rep_mask"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["mask_img", 0], "amount": 3}}
        g["mask3"] = {"class_type": "ImageToMask", "inputs": {"image": ["rep_mask", 0], "channel": "red"}}
        g["subject0"]["inputs"]["image"] = ["rep_img", 0]
        g["subject0"]["inputs"]["mask"] = ["mask3", 0]
        return g, r"2 image\(s\) but 3 mask\(s\)"
    if name == "image encoder differs":
        g["adapter"]["inputs"]["adapter_name"] = "vit_h_moa.safetensors"
        return g, r"clip_vision gives 768-d image embeddings, but the adapter expects clip_vit_h14 \(1024-d\)"
    if name == "not an SD1.5 model":
        g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd2_unet.safetensors",
                                                          "weight_dtype": "default"}}
        g["apply"]["inputs"]["model"] = ["unet", 0]
        return g, r"model is SD20 \(context_dim 1024\); MoA adapters run on SD1\.5 or SDXL models"
    if name == "NaN strength":              # JSON allows NaN and ComfyUI's range check lets it through
        g["apply"]["inputs"]["strength"] = float("nan")
        return g, r"^MoA Apply: strength must be a number in \[0, 3.0\], got nan \(0 = the base model"
    if name == "NaN end_percent":
        g["apply"]["inputs"]["end_percent"] = float("nan")
        return g, r"^MoA Apply: end_percent must be a number in \[0, 1\], got nan"
    if name == "layer set without layers":  # the tiny checkpoint has no middle block
        g = moa_graph(ADAPTER, ONE, PROMPT)
        g["maps"]["inputs"]["layers"] = "middle block"
        return g, (r"^MoA Router Maps: layers 'middle block' has no attention layers in this model \(it has \d+: "
                   r".*\)\. Choose 'all layers' or another set")
    if name == "router map pictures differ from latents":
        g = moa_graph(ADAPTER, ONE, PROMPT)
        g["two_pictures"] = {"class_type": "ImageBatch", "inputs": {"image1": ["decode", 0], "image2": ["decode", 0]}}
        g["maps"]["inputs"]["image"] = ["two_pictures", 0]
        return g, r"^MoA Router Maps: image has 2 pictures for 1 latents in samples: connect the VAE Decode"
    if name == "missing adapter file":
        g["adapter"]["inputs"]["adapter_name"] = "nope.safetensors"
        return g, None          # rejected at validation (HTTP 400)
    raise KeyError(name)


@pytest.mark.parametrize("case", ["word not in prompt", "more subjects than words", "mask size differs",
                                  "empty mask", "batch lengths differ", "image encoder differs",
                                  "not an SD1.5 model", "missing adapter file", "NaN strength", "NaN end_percent",
                                  "layer set without layers", "router map pictures differ from latents"])
def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(server, server_inputs, case):
    g, pattern = _bad(case)
    if pattern is None:
        code, body = server.post(g)
        assert code == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
        assert "nope.safetensors" in str(body["node_errors"])
    else:
        entry = server.run(g)
        err = execution_error(entry)
        assert entry["status"]["status_str"] == "error" and err is not None
        import re
        assert re.search(pattern, err["exception_message"]), err["exception_message"]
        # the refusal names its node and keeps the pack's error type (ComfyUI shows both)
        assert err["exception_message"].startswith(("MoA Apply: ", "MoA Subject ", "MoA Router Maps: ")), err
        assert err["exception_type"].rsplit(".", 1)[-1] in {
            "MoAInputError", "ClassWordError", "SubjectImageError", "ModelMismatchError", "AdapterFileError"}, err
        if case.startswith("NaN"):
            forget_non_json_prompt(server, entry)
    ok = copy.deepcopy(moa_graph(ADAPTER, ONE, PROMPT, maps=False, seed=hash(case) % 1000))
    assert_success(server.run(ok))


def forget_non_json_prompt(server, entry: dict) -> None:
    """ComfyUI keeps the NaN graph in its history and serves it back as `NaN`, which is not JSON:
    the graph editor's queue panel then fails to parse /history on every page load (seen as
    console errors in the browser tests). Delete that entry, and check /history is JSON again."""
    import json
    server.request("/history", {"delete": [entry["prompt"][1]]})
    raw = server.request("/history?max_items=10000", timeout=60)
    text = raw.decode() if isinstance(raw, bytes) else json.dumps(raw)

    def refuse(token):
        raise AssertionError(f"/history still holds {token}")
    json.loads(text, parse_constant=refuse)


def test_all_ones_mask_is_allowed(server, server_inputs):
    g = moa_graph(ADAPTER, [{"image": "person.png", "mask": "full_mask.png", "word": "man"}], PROMPT, maps=False)
    assert_success(server.run(g))


def test_no_memory_leak_warnings_after_moa_runs(server, server_inputs):
    """ComfyUI warns 'memory leak with model X' when a loaded model outlives its patcher."""
    for strength in (0.5, 0.75):
        g = moa_graph(ADAPTER, [{"image": "person.png", "mask": "person_mask.png", "word": "man"}], PROMPT,
                      strength=strength, maps=False)
        assert_success(server.run(g))
    log = server.log_path.read_text(errors="replace")
    assert "memory leak" not in log, [l for l in log.splitlines() if "memory leak" in l][:3]
