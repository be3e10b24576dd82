"""API-format graphs for the server tests, and the real photos and masks they load.

Photos come from scikit-image's bundled data (real pictures that ship inside a wheel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CHECKPOINT = "tiny_sd15.safetensors"
CLIP_VISION = "tiny_clip_vision_vit_l14.safetensors"
ADAPTER = "tiny_moa.safetensors"          # written into models/moa by the `server_inputs` fixture
SDXL_CHECKPOINT = "tiny_sdxl.safetensors"  # these two by `sdxl_server_inputs`
SDXL_ADAPTER = "tiny_moa_sdxl.safetensors"


def write_inputs(input_dir: Path) -> dict[str, str]:
    """Reference photos + subject masks (white = subject) in ComfyUI's input folder."""
    from skimage import data

    input_dir.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()                     # 512x512, a person
    cat = data.chelsea()                             # 300x451, a cat
    Image.fromarray(astronaut).save(input_dir / "person.png")
    Image.fromarray(cat).save(input_dir / "cat.png")
    yy, xx = np.mgrid[:512, :512]
    person = (((xx - 230) / 150) ** 2 + ((yy - 260) / 250) ** 2 <= 1).astype(np.uint8) * 255
    Image.fromarray(person).save(input_dir / "person_mask.png")
    yy, xx = np.mgrid[:300, :451]
    cat_mask = (((xx - 220) / 140) ** 2 + ((yy - 160) / 120) ** 2 <= 1).astype(np.uint8) * 255
    Image.fromarray(cat_mask).save(input_dir / "cat_mask.png")
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(input_dir / "empty_mask.png")
    Image.fromarray(np.full((512, 512), 255, np.uint8)).save(input_dir / "full_mask.png")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(input_dir / "left_region.png")
    return {"person": "person.png", "cat": "cat.png"}


def base_graph(prompt: str = "a photo of a man at the beach", seed: int = 1, steps: int = 2,
               size: int = 64, positive_from: list | None = None, model_from: list | None = None) -> dict:
    """Checkpoint -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model_from or ["ckpt", 0], "positive": positive_from or ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "moa_test"}},
    }


def subject_nodes(name: str, image: str, mask: str | None, word: str, previous: list | None = None,
                  region: str | None = None) -> dict:
    g = {f"{name}_img": {"class_type": "LoadImage", "inputs": {"image": image}}}
    inputs = {"image": [f"{name}_img", 0], "class_word": word}
    if mask is not None:
        g[f"{name}_mask"] = {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}}
        inputs["mask"] = [f"{name}_mask", 0]
    if region is not None:
        g[f"{name}_region"] = {"class_type": "LoadImageMask", "inputs": {"image": region, "channel": "red"}}
        inputs["region"] = [f"{name}_region", 0]
    if previous is not None:
        inputs["previous"] = previous
    g[name] = {"class_type": "MoASubject", "inputs": inputs}
    return g


def moa_nodes(adapter: str, subjects: list[dict], prompt: str, *, strength: float = 1.0, routing: str = "soft",
              model_from: list | None = None) -> dict:
    """MoA Subject chain (in order) + adapter + image encoder + MoA Apply on `model_from` (default the checkpoint)."""
    g, previous = {}, None
    for i, s in enumerate(subjects):
        g.update(subject_nodes(f"subject{i}", s["image"], s.get("mask"), s["word"], previous, s.get("region")))
        previous = [f"subject{i}", 0]
    g["adapter"] = {"class_type": "MoAAdapterLoader", "inputs": {"adapter_name": adapter}}
    g["clipvision"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}}
    g["apply"] = {"class_type": "MoAApply", "inputs": {
        "model": model_from or ["ckpt", 0], "moa_adapter": ["adapter", 0], "clip": ["ckpt", 1],
        "clip_vision": ["clipvision", 0], "subjects": previous, "prompt": prompt, "strength": strength,
        "start_percent": 0.0, "end_percent": 1.0, "routing": routing}}
    return g


def moa_graph(adapter: str, subjects: list[dict], prompt: str, *, strength: float = 1.0, routing: str = "soft",
              seed: int = 1, maps: bool = True) -> dict:
    """base_graph with MoA Apply between the checkpoint and the sampler; subjects chained in order."""
    g = base_graph(prompt, seed=seed, positive_from=["apply", 1], model_from=["apply", 0])
    g.pop("pos")
    g.update(moa_nodes(adapter, subjects, prompt, strength=strength, routing=routing))
    if maps:
        g["maps"] = {"class_type": "MoARouterMaps", "inputs": {
            "model": ["apply", 0], "samples": ["sampler", 0], "layers": "all layers", "image": ["decode", 0],
            "opacity": 0.5}}
        g["save_maps"] = {"class_type": "SaveImage", "inputs": {"images": ["maps", 1], "filename_prefix": "moa_maps"}}
        g["mask_preview"] = {"class_type": "MaskToImage", "inputs": {"mask": ["maps", 0]}}
        g["save_mask"] = {"class_type": "SaveImage", "inputs": {"images": ["mask_preview", 0],
                                                                "filename_prefix": "moa_mask"}}
    return g
