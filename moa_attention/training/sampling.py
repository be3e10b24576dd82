"""Sample images during training, through ComfyUI's own sampler with the MoA patch, exactly
as the nodes run it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..comfyui.adapters import LoadedAdapter
from ..comfyui.batch import SubjectBinding
from ..comfyui.patch import apply_moa
from ..comfyui.sampling import sample_image, unload_models
from ..comfyui.subjects import fused_context
from .config import TrainConfig
from .encode import Example


def write_sample(cfg: TrainConfig, model, vae, adapter: LoadedAdapter, example: Example, step: int,
                 device: torch.device) -> Path:
    from PIL import Image

    with torch.no_grad():
        fused = fused_context(adapter.adapter.fusion, example.text, example.positions, example.features)
    patched = apply_moa(model, adapter, [SubjectBinding(example.text, fused.to(example.text.dtype))])
    # SDXL's pooled output goes in as CLIPTextEncode puts it (the sampler makes `y` from it and the
    # size); the negative is zeroed as ConditioningZeroOut zeroes both
    pooled = {} if example.pooled is None else {"pooled_output": example.pooled[None]}
    positive = [[example.text[None], pooled]]
    negative = [[torch.zeros_like(example.text)[None], {k: torch.zeros_like(v) for k, v in pooled.items()}]]
    image = sample_image(patched, vae, positive, negative, cfg.resolution, cfg.sample_steps, cfg.seed)
    # ComfyUI keeps the last sampled model loaded (patched); unloading moves the UNet and the
    # adapter to the offload device: put both back where training runs
    unload_models()
    model.model.diffusion_model.to(device)
    adapter.adapter.to(device)
    path = cfg.output_dir / "samples" / f"step_{step:06d}.png"
    Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8")).save(path)
    return path
