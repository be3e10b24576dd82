"""The paper's applications end to end through a real headless ComfyUI server: subject swap on a photo
(DDIM inversion + KSamplerAdvanced), morph sequence, two subjects with regions, MoA with a style LoRA in
both load orders and with ControlNet; bad inputs give clear errors and the server keeps serving."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, execution_error
from support import app_graphs as ag
from test_server import assert_success, forget_non_json_prompt, images_of


NEW_NODES = {"MoASubjectMorph": "MoA Subject Morph", "MoAInvertPhoto": "MoA Invert Photo",
             "MoADDIMInversionSampler": "MoA DDIM Inversion Sampler"}


def test_application_nodes_are_listed_with_tooltips(server):
    info = server.request("/object_info")
    for node, display in NEW_NODES.items():
        assert info[node]["display_name"] == display and info[node]["category"] == "MoA" and info[node]["description"]
        assert all(info[node]["output_tooltips"]), node
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert "subject" in info["MoARouterMaps"]["input"]["optional"]


def latent_of(server, entry: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"].float()


def run_ok(server, graph) -> dict:
    entry = server.run(graph)
    assert_success(entry)
    return entry


def test_subject_swap_on_a_photo(server, app_inputs, capsys):
    """Without a subject the photo's latent comes back (how the error shrinks with steps and refine is
    test_applications.py's); with a subject confined to the old subject's region, the rest of the photo
    stays closer to the photo than the region does."""
    entry = run_ok(server, ag.swap_graph(steps=50, subject=False, refine=3))
    photo, back = latent_of(server, entry, "save_photo_latent"), latent_of(server, entry, "save_result_latent")
    error = ((back - photo).abs().mean() / photo.abs().mean()).item()
    assert error < 0.01, error

    entry = run_ok(server, ag.swap_graph(steps=20, refine=3))
    photo, swapped = latent_of(server, entry, "save_photo_latent"), latent_of(server, entry, "save_result_latent")
    (img,) = images_of(server, entry, "save")
    assert img.shape == (ag.SIZE, ag.SIZE, 3)
    region = torch.zeros(ag.SIZE // 8, ag.SIZE // 8, dtype=torch.bool)
    region[1:, 1:6] = True                               # photo_subject_region.png at latent size (rows 8.., cols 12..44)
    change = (swapped - photo).abs().mean(dim=(0, 1))
    inside, outside = change[region].mean().item(), change[~region].mean().item()
    with capsys.disabled():
        print(f"\nsubject swap through the server, relative latent error without a subject (50 steps + 3 refine): "
              f"{error:.4f}; with a subject (20 steps + 3 refine): mean change inside the old subject's region "
              f"{inside:.4f}, outside {outside:.4f}")
    assert outside < inside, (inside, outside)


def test_morph_sequence_renders_one_image_per_factor(server, app_inputs):
    entry = run_ok(server, ag.morph_graph(frames=3))
    frames = images_of(server, entry, "save")
    assert len(frames) == 3 and all(f.shape == (ag.SIZE, ag.SIZE, 3) for f in frames)
    assert len(entry["outputs"]["animation"]["images"]) == 1            # one animated PNG of the sequence
    # the ends are the pure subjects: factor 0 of a single render equals frame 0 with the same seed
    single = run_ok(server, ag.morph_graph(mode="single", factor=0.0))
    (a,) = images_of(server, single, "save")
    assert np.abs(a.astype(int) - frames[0].astype(int)).max() <= 1


def save_overlay_picture(server, entry: dict) -> None:
    """docs/router_map_overlay.png for docs/applications.md: the picture, the router map over it (all subjects), and each
    subject's map, side by side (tiny random models: it shows what the node gives, not a trained adapter)."""
    from PIL import Image, ImageDraw

    from comfyui_moa.nodes.router_maps import heat_colors
    picture = images_of(server, entry, "save")[0]

    def over(i):                    # the node's colours (blue = base model, red = subject), mostly opaque
        share = torch.from_numpy(images_of(server, entry, f"save_mask{i}")[0][..., 0] / 255.0).float()
        return (0.2 * picture + 0.8 * heat_colors(share[None])[0].numpy() * 255).astype(np.uint8)
    panels = [("picture", picture), ("router map, all subjects", over(0)), ("subject 1 (man, left region)", over(1)),
              ("subject 2 (cat, right region)", over(2))]
    side, gap, head = 192, 8, 22
    sheet = Image.new("RGB", (len(panels) * (side + gap) - gap, side + head), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, pic) in enumerate(panels):
        sheet.paste(Image.fromarray(pic).resize((side, side), Image.NEAREST), (i * (side + gap), head))
        draw.text((i * (side + gap) + 4, 4), title, fill="black")
    out = ROOT / "docs" / "router_map_overlay.png"
    out.parent.mkdir(exist_ok=True)
    sheet.save(out, optimize=True)


def test_two_subjects_with_regions_stay_in_their_regions(server, app_inputs):
    entry = run_ok(server, ag.regions_graph())
    if os.environ.get("MOA_SCREENSHOTS"):
        save_overlay_picture(server, entry)
    for i, (lo, hi) in ((1, (0, ag.SIZE // 2 - 8)), (2, (ag.SIZE // 2 + 8, ag.SIZE))):
        (m,) = images_of(server, entry, f"save_mask{i}")
        share = m[..., 0].astype(float) / 255
        inside = share[:, lo:hi]
        outside = np.concatenate([share[:, : max(lo - 8, 0)], share[:, min(hi + 8, ag.SIZE):]], axis=1)
        # the map is exact at latent resolution; bilinear upsampling blurs one latent pixel (8 px) at the edge
        assert outside.size and outside.max() == 0.0, f"subject {i}'s map is not zero outside its region"
        assert inside.mean() > 0.3


@pytest.mark.parametrize("order", ["lora_then_moa", "moa_then_lora"])
def test_moa_with_a_style_lora_in_both_orders(server, app_inputs, order):
    (ref,) = images_of(server, run_ok(server, ag.lora_graph("none")), "save")
    (plain,) = images_of(server, run_ok(server, ag.plain_nodes(ag.STYLE_PROMPT, seed=5)), "save")
    assert not np.array_equal(ref, plain), "the LoRA must change the picture"
    (zero,) = images_of(server, run_ok(server, ag.lora_graph(order, strength=0.0)), "save")
    assert np.array_equal(zero, ref), "MoA at strength 0 must give the LoRA graph bit for bit"
    (on,) = images_of(server, run_ok(server, ag.lora_graph(order, strength=1.0)), "save")
    assert not np.array_equal(on, ref)


def test_moa_with_controlnet(server, app_inputs):
    (ref,) = images_of(server, run_ok(server, ag.controlnet_graph(moa=False)), "save")
    (plain,) = images_of(server, run_ok(server, ag.plain_nodes(seed=6)), "save")
    assert not np.array_equal(ref, plain), "the ControlNet must change the picture"
    (zero,) = images_of(server, run_ok(server, ag.controlnet_graph(moa=True, strength=0.0)), "save")
    assert np.array_equal(zero, ref), "MoA at strength 0 must give the ControlNet graph bit for bit"
    (on,) = images_of(server, run_ok(server, ag.controlnet_graph(moa=True, strength=1.0)), "save")
    assert not np.array_equal(on, ref)


def _bad(case):
    if case == "photo size not a multiple of 8":
        return ag.swap_graph(steps=2, photo="photo_60x64.png"), r"MoA Invert Photo: image size 60x64 is not a multiple of 8"
    if case == "invert steps < 1":
        g = ag.swap_graph(steps=2)
        g["invert"]["inputs"]["steps"] = 0
        return g, None
    if case == "factor out of range":
        return ag.morph_graph(mode="single", factor=1.5), None
    if case == "mismatched subjects":
        g = ag.morph_graph()
        g.update(ag.subject_nodes("subjectC", "cat.png", "cat_mask.png", "man", previous=["subjectB", 0]))
        g["morph"]["inputs"]["subject_b"] = ["subjectC", 0]
        return g, r"MoA Subject Morph: mismatched subjects: subject_a has 1 subject\(s\), subject_b 2"
    if case == "overlapping regions":
        return (ag.regions_graph(regions=("region_wide.png", "region_b.png")),
                r"MoA Apply: the regions of MoA Subject 'man' and MoA Subject 'cat' overlap")
    if case == "empty region":
        return ag.regions_graph(regions=("empty_mask.png", "region_b.png")), r"the region mask is empty"
    if case == "model with MoA inverted":
        g = ag.swap_graph(steps=2)
        g["invert"]["inputs"]["model"] = ["apply", 0]
        return g, r"MoA Invert Photo: model carries a MoA patch; invert with the prior"
    if case == "MoA model in the inversion sampler":
        return (ag.inversion_sampler_graph(["apply", 0]),
                r"^MoA DDIM Inversion Sampler: model carries a MoA patch; invert with the prior")
    if case == "region batch of 2":
        g = ag.regions_graph()
        g["subject0"]["inputs"]["region"] = ag.mask_batch(g, "two_regions", ("region_a.png", "region_b.png"))
        return g, r"^MoA Subject 'man': region is a batch of 2 different masks, but one subject has one region"
    if case == "NaN photo inverted":
        g = ag.swap_graph(steps=2)
        g["invert"]["inputs"]["image"] = ag.nan_image(g, "nan_photo")
        return g, r"^MoA Invert Photo: image has 12288 non-finite value\(s\) \(12288 NaN, 0 inf\) of 12288\. The node"
    if case == "NaN pictures evaluated":
        g = ag.evaluate_graph()
        g["evaluate"]["inputs"]["images"] = ag.nan_image(g, "nan_pictures")
        return g, r"^MoA Evaluate: images has 12288 non-finite value\(s\)"
    if case == "NaN latent morphed":
        g = ag.morph_graph()
        g["nan_latent"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["latent", 0],
                                                                      "multiplier": float("nan")}}
        g["morph"]["inputs"]["latent"] = ["nan_latent", 0]
        return g, r"^MoA Subject Morph: latent\['samples'\] has 256 non-finite value\(s\) \(256 NaN"
    if case == "NaN subject photo":
        g = ag.morph_graph()
        g["subject0"]["inputs"]["image"] = ag.nan_image(g, "nan_subject")
        g["subject0"]["inputs"].pop("mask")
        return g, r"^MoA Subject 'man': image has 12288 non-finite value\(s\)"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["photo size not a multiple of 8", "invert steps < 1", "factor out of range",
                                  "mismatched subjects", "overlapping regions", "empty region",
                                  "model with MoA inverted", "MoA model in the inversion sampler",
                                  "region batch of 2", "NaN photo inverted", "NaN pictures evaluated",
                                  "NaN latent morphed", "NaN subject photo"])
def test_bad_application_inputs_give_clear_errors_and_the_server_keeps_serving(server, app_inputs, case):
    g, pattern = _bad(case)
    if pattern is None:                     # ComfyUI's own range check on the widget
        code, body = server.post(g)
        assert code == 400 and body["error"]["type"] == "prompt_outputs_failed_validation", body
    else:
        entry = server.run(g)
        err = execution_error(entry)
        assert entry["status"]["status_str"] == "error" and err is not None
        assert re.search(pattern, err["exception_message"]), err["exception_message"]
        if case.startswith("NaN"):
            forget_non_json_prompt(server, entry)
    run_ok(server, ag.morph_graph(mode="single", factor=0.25, seed=hash(case) % 1000))


def test_inversion_sampler_runs_with_the_prior_in_sampler_custom(server, app_inputs):
    entry = run_ok(server, ag.inversion_sampler_graph(["ckpt", 0]))
    noise = latent_of(server, entry, "save_noise")
    assert noise.shape == (1, 4, ag.SIZE // 8, ag.SIZE // 8) and torch.isfinite(noise).all()


def _batched(graph: dict, batch: int) -> dict:
    graph["latent"]["inputs"]["batch_size"] = batch
    return graph


def test_morph_sequence_over_a_latent_batch_gives_latents_x_factors_pictures_with_one_noise_per_latent(
        server, app_inputs):
    """Pictures in latent-major order: latent 1 at every factor, then latent 2. A morph of the man into himself
    shows the noise: equal pictures within a latent, different ones between latents."""
    g = _batched(ag.morph_graph(frames=3), 2)
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                              "filename_prefix": "latents/morph_batch"}}
    entry = run_ok(server, g)
    frames = images_of(server, entry, "save")
    assert len(frames) == 6 and all(f.shape == (ag.SIZE, ag.SIZE, 3) for f in frames)
    latents = latent_of(server, entry, "save_latent")
    assert latents.shape[0] == 6 and torch.isfinite(latents).all()
    # (the server's tiny adapter has an untrained fusion MLP, blind to the photos: its factors look alike; that
    # the factors differ is checked in-process, test_applications.py)
    same = images_of(server, run_ok(server, _batched(ag.morph_graph(frames=3, b_subject=ag.MAN), 2)), "save")
    assert len(same) == 6

    def close(a, b):
        return np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert all(close(same[3 * lat], same[3 * lat + i]) for lat in (0, 1) for i in (1, 2)), "one noise per latent"
    assert not close(same[0], same[3]), "the two latents keep different noise"
    assert close(frames[0], same[0]) and close(frames[3], same[3]), "factor 0 of each latent is the man"


def test_morph_single_on_a_batch_and_a_sampler_given_another_latent(server, app_inputs):
    """'single' renders every latent of the batch at the factor; a sequence whose LATENT output the sampler does
    not get renders what the sampler got, and the console says so once."""
    assert len(images_of(server, run_ok(server, _batched(ag.morph_graph(mode="single"), 3)), "save")) == 3
    message = "but MoA Subject Morph made 3 for its 3 factors, so the pictures are not the morph sequence"
    before = server.log_path.read_text(errors="replace").count(message)
    g = ag.morph_graph(frames=3, seed=11)
    g["sampler"]["inputs"]["latent_image"] = ["latent", 0]
    assert len(images_of(server, run_ok(server, g), "save")) == 1
    log = server.log_tail(200000)
    assert server.log_path.read_text(errors="replace").count(message) == before + 1, log[-3000:]
    assert "the sampler renders 1 latent(s), " + message in log


def test_evaluate_report_says_why_numbers_are_missing(server, app_inputs):
    entry = run_ok(server, ag.evaluate_graph(subject_mask_value=0.0))
    (text,) = entry["outputs"]["evaluate"]["text"]
    assert "latent change (samples is connected but baseline_samples is not" in text, text
    assert "subject_mask 1 is empty (no pixel above 0.5): the numbers inside the subject are missing" in text, text
    full = run_ok(server, ag.evaluate_graph(subject_mask_value=1.0, with_baseline_samples=True))
    (text,) = full["outputs"]["evaluate"]["text"]
    assert "subject_mask 1 covers the whole picture: the numbers outside the subject are missing" in text, text
    assert "latent change" not in text.split("\n")[1], text
