"""Sample images during training, through ComfyUI's own sampler with the MoA patch, exactly
as the nodes run it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..comfyui.adapters import LoadedAdapter
from ..comfyui.batch import SubjectBinding
from ..comfyui.patch import apply_moa
from ..comfyui.subjects import fused_context
from .config import TrainConfig
from .encode import Example


def write_sample(cfg: TrainConfig, model, vae, adapter: LoadedAdapter, example: Example, step: int,
                 device: torch.device) -> Path:
    import comfy.model_management
    import comfy.sample
    from PIL import Image

    with torch.no_grad():
        fused = fused_context(adapter.adapter.fusion, example.text, example.positions, example.features)
    patched = apply_moa(model, adapter, [SubjectBinding(example.text, fused.to(example.text.dtype))])
    latent = torch.zeros(1, 4, cfg.resolution // 8, cfg.resolution // 8)
    noise = comfy.sample.prepare_noise(latent, cfg.seed)
    positive = [[example.text[None], {}]]
    negative = [[torch.zeros_like(example.text)[None], {}]]
    with torch.no_grad():
        samples = comfy.sample.sample(patched, noise, cfg.sample_steps, 5.0, "euler", "normal", positive, negative,
                                      latent, disable_pbar=True, seed=cfg.seed)
        image = vae.decode(model.model.process_latent_out(samples))[0].clamp(0, 1)
    # ComfyUI keeps the last sampled model loaded (patched) and, when it unloads, moves the UNet
    # and the adapter to the offload device: put both back where training runs
    comfy.model_management.unload_all_models()
    model.model.diffusion_model.to(device)
    adapter.adapter.to(device)
    path = cfg.output_dir / "samples" / f"step_{step:06d}.png"
    Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8")).save(path)
    return path
