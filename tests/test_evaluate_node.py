"""MoA Evaluate in-process in the real ComfyUI: context preservation on pictures sampled from a tiny
SD1.5 UNet (a fresh adapter keeps everything; a region-confined adapter keeps the context better
than the same adapter unconfined), ArcFace identity through the node, the text-encoder refusal."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

STEPS, CFG, HW = 3, 5.0, 16


@pytest.fixture(scope="module")
def vae(comfy):
    import comfy.sd
    from support.model_factory import taesd_state_dict
    return comfy.sd.VAE(sd={k: v.float() for k, v in taesd_state_dict().items()})


def _conds():
    g = torch.Generator().manual_seed(0)
    plain, neg = torch.randn(77, 768, generator=g), torch.randn(77, 768, generator=g)
    return plain, [[plain[None].clone(), {}]], [[neg[None], {}]]


def _adapter(model, perturbed: bool):
    """Every pixel routed to the personalized expert; a fresh expert (= the prior) or a perturbed one."""
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    ad = init_adapter_from_unet(model.get_model_object("diffusion_model"), expert="lowrank", rank=4, seed=0)
    g = torch.Generator().manual_seed(1)
    for w in ad.layers.values():
        w.router.fc2.weight.data.zero_()
        w.router.fc2.bias.data = torch.tensor([-50.0, 50.0])
        if perturbed:
            for p in w.expert.parameters():
                p.data.add_(torch.randn(p.shape, generator=g) * 0.02)   # small: a random UNet amplifies it
    return ad


def _run(comfy, vae, model, adapter=None, region=None):
    """(decoded picture [1, H, W, 3], router map at picture size or None) for one seed."""
    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa
    from comfyui_moa.nodes.router_maps import MoARouterMaps
    plain, pos, neg = _conds()
    if adapter is not None:
        model = apply_moa(model, adapter, [SubjectBinding(plain=plain, fused=plain.clone(), region=region)])
    latent = comfy[0].common_ksampler(model, 7, STEPS, CFG, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, HW, HW)})[0]
    image = vae.decode(latent["samples"]).float().cpu().clamp(0, 1)
    if adapter is None:
        return image, None, latent["samples"]
    mask, _ = MoARouterMaps().maps(model, latent, "all layers", image)
    return image, mask, latent["samples"]


def _numbers(report: str, label: str) -> dict[str, str]:
    lines = report.splitlines()
    head = next(l for l in lines if l.startswith("image "))
    cols = re.split(r"\s{2,}", head.strip())[1:]
    row = next(l for l in lines if l.startswith(label))
    return dict(zip(cols, row[len(label):].split()))


def test_fresh_adapter_preserves_everything_and_a_region_keeps_the_context(comfy, tiny_model, vae):
    from comfyui_moa.moa_attention.scoring.metrics import context_preservation
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    base, _, base_lat = _run(comfy, vae, tiny_model)
    h, w = base.shape[1:3]
    region = torch.zeros(h, w)
    region[:, : w // 2] = 1                                       # the subject may appear in the left half only

    fresh, fresh_map, fresh_lat = _run(comfy, vae, tiny_model, _adapter(tiny_model, perturbed=False))
    out = MoAEvaluate().evaluate(fresh, baseline=base, subject_mask=region[None], router_mask=fresh_map,
                                 samples={"samples": fresh_lat}, baseline_samples={"samples": base_lat})
    report, grid = out["result"]
    print("\n--- fresh adapter (personal = prior), every pixel routed to it ---\n" + report)
    n = _numbers(report, "picture 1")
    assert n["chg in"] == n["chg out"] == "0.0000" and n["PSNR in"] == n["PSNR out"] == "inf"
    assert n["SSIM out"] == "1.000" and n["lat chg in"] == n["lat chg out"] == "0.0000"
    assert out["ui"]["text"] == [report] and grid.shape[0] == 1 and grid.shape[-1] == 3

    ad = _adapter(tiny_model, perturbed=True)
    free, free_map, free_lat = _run(comfy, vae, tiny_model, ad)
    confined, conf_map, conf_lat = _run(comfy, vae, tiny_model, ad, region=region)
    report = MoAEvaluate().evaluate(torch.cat([free, confined]), baseline=base, subject_mask=region[None],
                                    router_mask=torch.cat([free_map, conf_map]),
                                    samples={"samples": torch.cat([free_lat, conf_lat])},
                                    baseline_samples={"samples": base_lat})["result"][0]
    print("\n--- the same perturbed adapter: picture 1 unconfined, picture 2 confined to the left half ---\n" + report)
    a, b = (context_preservation(base, x, region) for x in (free, confined))
    assert b.change_outside < a.change_outside and b.psnr_outside > a.psnr_outside and b.ssim_outside > a.ssim_outside
    n1, n2 = _numbers(report, "picture 1"), _numbers(report, "picture 2")
    assert float(n2["lat chg out"]) < float(n1["lat chg out"])
    # the region keeps the router off the context (up to the map's upsampling at the region's edge)
    assert float(n2["router bg"]) < 0.05 and float(n1["router bg"]) > 0.99
    assert float(n2["router subj"]) > 0.95 and float(n2["router AUROC"]) > 0.99


@pytest.fixture
def face_root(comfy, tmp_path, monkeypatch):
    pytest.importorskip("insightface")
    pytest.importorskip("onnx")
    import folder_paths
    from support.face_models import forbid_downloads, make_face_model_folder
    forbid_downloads(monkeypatch)
    make_face_model_folder(tmp_path, "fakeface")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(tmp_path)], {".onnx"}))
    return tmp_path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_arcface_identity_through_the_node(face_root):
    from skimage import data
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    from support.face_models import astronaut_with
    ast = torch.from_numpy(data.astronaut().astype(np.float32) / 255)[None]
    cat = torch.from_numpy(astronaut_with(data.chelsea()))[None]
    flat = torch.full_like(ast, 0.5)
    report, grid = MoAEvaluate().evaluate(torch.cat([ast, cat, flat]), reference=ast, face_model="fakeface",
                                          tile=64)["result"]
    print("\n" + report)
    assert float(_numbers(report, "picture 1")["id ArcFace"]) == pytest.approx(1.0, abs=1e-3)
    assert float(_numbers(report, "picture 2")["id ArcFace"]) < 0.9
    assert _numbers(report, "picture 3")["id ArcFace"] == "n/a"
    assert "picture 3: identity (ArcFace): picture: no face found" in report
    assert "not computed: prompt score" in report and "context preservation (connect baseline" in report
    assert grid.shape == (1, 3 * 64 + 4 * 4, 5 * 64 + 6 * 4, 3)


def test_text_encoder_without_projection_is_refused(comfy, tmp_path, monkeypatch):
    import folder_paths
    from safetensors.torch import save_file
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8)}, str(tmp_path / "sd15_te.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    assert "sd15_te.safetensors" in MoAEvaluate.INPUT_TYPES()["optional"]["text_encoder"][0]
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"^MoA Evaluate: .*prompt fidelity needs clip_vision"):
        MoAEvaluate().evaluate(image, prompt="a man", text_encoder="sd15_te.safetensors")
    from comfyui_moa.moa_attention.engine.errors import ModelMismatchError
    with pytest.raises(ModelMismatchError, match=r"^MoA Evaluate: text encoder sd15_te.safetensors has no text "
                                                 r"projection.*SD1.5 checkpoint.*clip-vit-large-patch14"):
        MoAEvaluate().evaluate(image, prompt="a man", text_encoder="sd15_te.safetensors", clip_vision=object())


def test_node_registration_and_tooltips(pack):
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    assert pack.NODE_CLASS_MAPPINGS["MoAEvaluate"] is MoAEvaluate
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["MoAEvaluate"] == "MoA Evaluate"
    types = MoAEvaluate.INPUT_TYPES()
    assert all(opts.get("tooltip") for group in types.values() for _, opts in group.values())
    assert MoAEvaluate.CATEGORY == "MoA" and len(MoAEvaluate.OUTPUT_TOOLTIPS) == len(MoAEvaluate.RETURN_TYPES)


@pytest.mark.slow
def test_evaluate_in_a_real_server_graph(server, server_inputs):
    """MoA with a region vs the same seed without MoA, scored by MoA Evaluate in the graph that made them."""
    from conftest import execution_error
    from support.graphs import ADAPTER, moa_graph
    prompt = "a photo of a man at the beach"
    g = moa_graph(ADAPTER, [{"image": "person.png", "mask": "person_mask.png", "word": "man",
                             "region": "left_region.png"}], prompt)
    g["b_pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}}
    g["b_sampler"] = {"class_type": "KSampler", "inputs": {**g["sampler"]["inputs"], "model": ["ckpt", 0],
                                                           "positive": ["b_pos", 0]}}
    g["b_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["b_sampler", 0], "vae": ["ckpt", 2]}}
    g["evaluate"] = {"class_type": "MoAEvaluate", "inputs": {
        "images": ["decode", 0], "baseline": ["b_decode", 0], "subject_mask": ["subject0_region", 0],
        "router_mask": ["maps", 0], "reference": ["subject0_img", 0], "reference_mask": ["subject0_mask", 0],
        "clip_vision": ["clipvision", 0], "prompt": prompt, "text_encoder": "none", "face_model": "none",
        "provider": "CPU", "tile": 64}}
    g["save_grid"] = {"class_type": "SaveImage", "inputs": {"images": ["evaluate", 1], "filename_prefix": "moa_eval"}}
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (report,) = entry["outputs"]["evaluate"]["text"]
    print("\n" + report)
    n = _numbers(report, "picture 1")
    assert float(n["router bg"]) < 0.1 < 0.4 < float(n["router subj"])      # the region keeps the router off the context
    assert -1 <= float(n["id CLIP"]) <= 1 and n["PSNR out"] != "n/a" and "prompt score" in report
    assert entry["outputs"]["save_grid"]["images"]
    info = server.request("/object_info/MoAEvaluate")["MoAEvaluate"]
    assert info["display_name"] == "MoA Evaluate" and info["output_node"] is True
    assert "none" in info["input"]["optional"]["text_encoder"][0]
