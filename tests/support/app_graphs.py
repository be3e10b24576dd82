"""API-format graphs of the paper's applications (subject swap, morph, regions, LoRA, ControlNet), and the
extra files they load: a style LoRA and a ControlNet for the tiny checkpoint, region masks, a photo, a pose."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import graphs
from .graphs import ADAPTER, base_graph, subject_nodes

LORA = "tiny_style_lora.safetensors"
SMOOTH_UNET = "tiny_sd15_smooth_unet.safetensors"
#: a random UNet is no denoiser: its noise prediction is large and chaotic in x, and DDIM inversion (exact only as
#: the steps shrink) then drifts far. Scaling the output conv (which real training starts from zero) gives a small,
#: smooth prediction, closer to a trained model's behaviour; the swap tests invert with it.
SMOOTH_OUTPUT_SCALE = 0.02
CONTROLNET = "tiny_controlnet.safetensors"
PHOTO_PROMPT = "a photo of a man at the beach"
STYLE_PROMPT = "a photo of a man at the beach, oil painting, impressionist style"
SIZE = 64


def write_lora(path: Path, unet_state: dict, rank: int = 2, scale: float = 0.5, seed: int = 3) -> Path:
    """A LoRA on the attention projections (attn1.to_q, attn2.to_v), in the diffusion_model.* key format
    ComfyUI's LoRA loaders read."""
    from .model_factory import _save_atomic
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in unet_state.items():
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
            stem = "diffusion_model." + key[: -len(".weight")]
            sd[f"{stem}.lora_up.weight"] = (torch.randn(value.shape[0], rank, generator=g) * scale).half()
            sd[f"{stem}.lora_down.weight"] = (torch.randn(rank, value.shape[1], generator=g) * scale).half()
    return _save_atomic(sd, path)


def write_smooth_unet(path: Path, unet_config: dict, seed: int = 0) -> Path:
    """The tiny checkpoint's UNet (same seed and config) with its output conv scaled by SMOOTH_OUTPUT_SCALE."""
    from .model_factory import _save_atomic, unet_state_dict
    sd = unet_state_dict(unet_config, seed, dtype=torch.float32)
    sd["out.2.weight"] = sd["out.2.weight"] * SMOOTH_OUTPUT_SCALE
    sd["out.2.bias"] = sd["out.2.bias"] * SMOOTH_OUTPUT_SCALE
    return _save_atomic({k: v.half() for k, v in sd.items()}, path)


def write_controlnet(path: Path, unet_config: dict, seed: int = 5) -> Path:
    """A ControlNet of the tiny checkpoint's UNet shape (ldm `control_model.*` keys) that ControlNetLoader loads."""
    import comfy.cldm.cldm
    import comfy.ops

    from .model_factory import _save_atomic, _to_dtype, init_weights_
    cfg = {k: v for k, v in unet_config.items() if k != "transformer_depth_output"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
    init_weights_(net, seed)
    return _save_atomic({"control_model." + k: v for k, v in _to_dtype(net.state_dict(), torch.float16).items()},
                        path)


def write_app_inputs(input_dir: Path) -> None:
    """Two disjoint regions, a 64x64 photo (and a 60x64 one for the size error), a pose-like hint."""
    from skimage import data
    input_dir.mkdir(parents=True, exist_ok=True)
    left, right = np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2 - 8] = 255
    right[:, SIZE // 2 + 8:] = 255
    Image.fromarray(left).save(input_dir / "region_a.png")
    Image.fromarray(right).save(input_dir / "region_b.png")
    wide = np.zeros((SIZE, SIZE), np.uint8)
    wide[:, : SIZE // 2 + 16] = 255
    Image.fromarray(wide).save(input_dir / "region_wide.png")
    photo = Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.BICUBIC)
    photo.save(input_dir / "photo.png")
    photo.resize((60, SIZE)).save(input_dir / "photo_60x64.png")
    old_subject = np.zeros((SIZE, SIZE), np.uint8)
    old_subject[8:, 12:44] = 255                   # where the astronaut is in the small photo
    Image.fromarray(old_subject).save(input_dir / "photo_subject_region.png")
    pose = np.zeros((SIZE, SIZE, 3), np.uint8)
    for (y0, x0), (y1, x1) in [((10, 32), (30, 32)), ((30, 32), (50, 22)), ((30, 32), (50, 42)), ((18, 20), (18, 44))]:
        for t in np.linspace(0, 1, 40):
            y, x = int(y0 + (y1 - y0) * t), int(x0 + (x1 - x0) * t)
            pose[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 255
    Image.fromarray(pose).save(input_dir / "pose.png")


def plain_nodes(prompt: str = PHOTO_PROMPT, seed: int = 1) -> dict:
    """Checkpoint, prompts, latent, KSampler, decode, save: the base graph the others extend."""
    return base_graph(prompt, seed=seed, size=SIZE)


def moa_nodes(subjects: list[dict], prompt: str, *, model_from=None, strength: float = 1.0) -> dict:
    return graphs.moa_nodes(ADAPTER, subjects, prompt, strength=strength, model_from=model_from)


MAN = {"image": "person.png", "mask": "person_mask.png", "word": "man"}
CAT = {"image": "cat.png", "mask": "cat_mask.png", "word": "cat"}


def swap_graph(*, steps: int = 10, subject: bool = True, region: str | None = "photo_subject_region.png",
               photo: str = "photo.png", strength: float = 1.0, refine: int = 0) -> dict:
    """Invert the photo with the prior and the photo's prompt, regenerate with KSamplerAdvanced (add_noise
    disabled) from MoA Apply's model and prompt (or, without a subject, the plain model and prompt); the
    photo's latent and the result's latent are saved for comparison."""
    g = plain_nodes()
    for k in ("latent", "sampler"):
        g.pop(k)
    g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": SMOOTH_UNET, "weight_dtype": "default"}}
    g["photo"] = {"class_type": "LoadImage", "inputs": {"image": photo}}
    g["invert"] = {"class_type": "MoAInvertPhoto", "inputs": {
        "model": ["unet", 0], "vae": ["ckpt", 2], "image": ["photo", 0], "positive": ["pos", 0],
        "negative": ["neg", 0], "steps": steps, "scheduler": "normal", "cfg": 1.0, "refine": refine}}
    model, positive = ["unet", 0], ["pos", 0]
    if subject:
        g.update(moa_nodes([dict(MAN, region=region) if region else MAN], PHOTO_PROMPT, strength=strength,
                           model_from=["unet", 0]))
        model, positive = ["apply", 0], ["apply", 1]
    g["sampler"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": model, "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": positive, "negative": ["neg", 0], "latent_image": ["invert", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    g["save_photo_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["invert", 1],
                                                                    "filename_prefix": "latents/photo"}}
    g["save_result_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                                     "filename_prefix": "latents/result"}}
    return g


def morph_graph(*, mode: str = "sequence", factor: float = 0.5, frames: int = 3, seed: int = 1,
                b_subject: dict | None = None) -> dict:
    g = plain_nodes(seed=seed)
    g.pop("pos")
    g.update(moa_nodes([MAN], PHOTO_PROMPT))
    b = b_subject or {"image": "cat.png", "mask": "cat_mask.png", "word": "man"}
    g.update(subject_nodes("subjectB", b["image"], b.get("mask"), b["word"]))
    g["morph"] = {"class_type": "MoASubjectMorph", "inputs": {
        "subject_a": ["subject0", 0], "subject_b": ["subjectB", 0], "latent": ["latent", 0], "mode": mode,
        "factor": factor, "frames": frames}}
    g["apply"]["inputs"]["subjects"] = ["morph", 0]
    g["sampler"]["inputs"].update(model=["apply", 0], positive=["apply", 1], latent_image=["morph", 1])
    g["animation"] = {"class_type": "SaveAnimatedPNG", "inputs": {
        "images": ["decode", 0], "filename_prefix": "moa_morph", "fps": 4.0, "compress_level": 4}}
    return g


def regions_graph(*, regions=("region_a.png", "region_b.png"), seed: int = 1) -> dict:
    g = plain_nodes(seed=seed)
    g.pop("pos")
    g.update(moa_nodes([dict(MAN, region=regions[0]), dict(CAT, region=regions[1])], "a man and a cat in a garden"))
    g["sampler"]["inputs"].update(model=["apply", 0], positive=["apply", 1])
    for i in (0, 1, 2):                  # 0: all subjects
        g[f"maps{i}"] = {"class_type": "MoARouterMaps", "inputs": {
            "model": ["apply", 0], "samples": ["sampler", 0], "layers": "all layers", "image": ["decode", 0],
            "opacity": 0.5, "subject": i}}
        g[f"mask{i}"] = {"class_type": "MaskToImage", "inputs": {"mask": [f"maps{i}", 0]}}
        g[f"save_mask{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"mask{i}", 0],
                                                                    "filename_prefix": f"moa_subject{i}_map"}}
        g[f"save_overlay{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"maps{i}", 1],
                                                                       "filename_prefix": f"moa_subject{i}_overlay"}}
    return g


def lora_graph(order: str, *, strength: float = 0.0, seed: int = 5) -> dict:
    """order: 'none' (LoRA, no MoA), 'lora_then_moa', 'moa_then_lora'."""
    g = plain_nodes(STYLE_PROMPT, seed=seed)
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": LORA,
                                                            "strength_model": 1.0}}
    g["lora"] = lora
    if order == "none":
        g["sampler"]["inputs"]["model"] = ["lora", 0]
        return g
    g.pop("pos")
    g.update(moa_nodes([MAN], STYLE_PROMPT, strength=strength))
    g["sampler"]["inputs"]["positive"] = ["apply", 1]
    if order == "lora_then_moa":
        g["apply"]["inputs"]["model"] = ["lora", 0]
        g["sampler"]["inputs"]["model"] = ["apply", 0]
    else:
        lora["inputs"]["model"] = ["apply", 0]
        g["sampler"]["inputs"]["model"] = ["lora", 0]
    return g


def controlnet_graph(*, moa: bool, strength: float = 0.0, seed: int = 6) -> dict:
    g = plain_nodes(seed=seed)
    positive = ["pos", 0]
    if moa:
        g.pop("pos")
        g.update(moa_nodes([MAN], PHOTO_PROMPT, strength=strength))
        g["sampler"]["inputs"]["model"] = ["apply", 0]
        positive = ["apply", 1]
    g["cn_loader"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    g["pose"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    g["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": positive, "negative": ["neg", 0], "control_net": ["cn_loader", 0], "image": ["pose", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["sampler"]["inputs"].update(positive=["cn_apply", 0], negative=["cn_apply", 1])
    return g


def nan_image(g: dict, name: str, size: int = SIZE) -> list:
    """An IMAGE of NaN pixels (SolidMask's value comes through JSON as NaN; ComfyUI's range check lets it
    through), as a user's broken upstream node would give."""
    g[f"{name}_mask"] = {"class_type": "SolidMask", "inputs": {"value": float("nan"), "width": size, "height": size}}
    g[name] = {"class_type": "MaskToImage", "inputs": {"mask": [f"{name}_mask", 0]}}
    return [name, 0]


def mask_batch(g: dict, name: str, files: tuple[str, str]) -> list:
    """A MASK batch of two mask files (through images: ComfyUI has no mask batch node)."""
    for i, f in enumerate(files):
        g[f"{name}_load{i}"] = {"class_type": "LoadImageMask", "inputs": {"image": f, "channel": "red"}}
        g[f"{name}_img{i}"] = {"class_type": "MaskToImage", "inputs": {"mask": [f"{name}_load{i}", 0]}}
    g[f"{name}_batch"] = {"class_type": "ImageBatch", "inputs": {"image1": [f"{name}_img0", 0],
                                                                "image2": [f"{name}_img1", 0]}}
    g[name] = {"class_type": "ImageToMask", "inputs": {"image": [f"{name}_batch", 0], "channel": "red"}}
    return [name, 0]


def inversion_sampler_graph(model_from: list) -> dict:
    """SamplerCustom (add_noise off, cfg 1) + MoA DDIM Inversion Sampler on the photo's latent, with MoA Apply's
    model and prompt available (model_from picks the model the sampler gets)."""
    g = plain_nodes()
    for k in ("latent", "sampler", "decode", "save"):
        g.pop(k)
    g.update(moa_nodes([MAN], PHOTO_PROMPT))
    g["photo"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["photo", 0], "vae": ["ckpt", 2]}}
    g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": model_from, "scheduler": "normal", "steps": 2,
                                                              "denoise": 1.0}}
    g["inverter"] = {"class_type": "MoADDIMInversionSampler", "inputs": {"refine": 0}}
    g["invert"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model_from, "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["inverter", 0], "sigmas": ["sigmas", 0], "latent_image": ["encode", 0]}}
    g["save_noise"] = {"class_type": "SaveLatent", "inputs": {"samples": ["invert", 0],
                                                             "filename_prefix": "latents/inverted"}}
    return g


def evaluate_graph(*, subject_mask_value: float = 0.0, with_baseline_samples: bool = False) -> dict:
    """The plain picture scored against itself as baseline, with a solid subject mask and the sampler's latent."""
    g = plain_nodes()
    g["solid"] = {"class_type": "SolidMask", "inputs": {"value": subject_mask_value, "width": SIZE, "height": SIZE}}
    g["evaluate"] = {"class_type": "MoAEvaluate", "inputs": {
        "images": ["decode", 0], "baseline": ["decode", 0], "subject_mask": ["solid", 0],
        "samples": ["sampler", 0], "prompt": "", "text_encoder": "none", "face_model": "none", "provider": "CPU",
        "tile": 64}}
    if with_baseline_samples:
        g["evaluate"]["inputs"]["baseline_samples"] = ["sampler", 0]
    return g
