"""ComfyUI's noise schedule, latent space and sampler, for the code that runs outside a graph:
the trainer (its encoded dataset and its samples) and the toy-world experiment."""
from __future__ import annotations

import torch


def alphas_cumprod(base_model) -> torch.Tensor:
    """The discrete schedule's abar_t of a BaseModel (a MODEL's `.model`), from its model_sampling
    (sigma^2 = (1 - abar) / abar), in fp32."""
    sigmas = base_model.model_sampling.sigmas.float()
    return 1.0 / (1.0 + sigmas ** 2)


def image_to_latent(model, vae, images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] pictures to the latents `model` denoises (VAE Encode, then the model's scaling)."""
    return model.model.process_latent_in(vae.encode(images))


def unet_y(model, conditioning: list, width: int, height: int) -> torch.Tensor | None:
    """[D] the `y` vector `model`'s UNet takes with the first entry of `conditioning` on a width x
    height picture (SDXL: the pooled text and six size embeddings, 2816 wide), made by ComfyUI's
    own code as its sampler makes it: comfy.samplers.encode_model_conds over the model's
    extra_conds, the size from the latent, no crop, target size the same. None for a model that
    takes no `y` (SD1.5)."""
    import comfy.sampler_helpers
    import comfy.samplers
    noise = torch.zeros(1, 4, height // 8, width // 8)
    conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, noise, torch.device("cpu"), "positive")
    y = conds[0]["model_conds"].get("y")
    return None if y is None else y.cond[0].float()


def sample_image(model, vae, positive: list, negative: list, size: int, steps: int, seed: int,
                 cfg: float = 5.0) -> torch.Tensor:
    """One [H, W, 3] picture in [0, 1]: ComfyUI's euler sampler from an empty latent, then VAE Decode."""
    import comfy.sample
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                      disable_pbar=True, seed=seed)
        return vae.decode(model.model.process_latent_out(samples))[0].clamp(0, 1)


def unload_models() -> None:
    """Unload what ComfyUI keeps loaded after sampling: it moves those models to their offload
    device, so a caller training on another device must move its modules back."""
    import comfy.model_management
    comfy.model_management.unload_all_models()


def unit_scale_patcher(base_model, device: torch.device | str = "cpu"):
    """A MODEL (ModelPatcher) around a BaseModel whose latents are already at unit scale (no VAE,
    as in the toy world): SD1.5's latent scale 0.18215 would rescale them on the way in and out."""
    import comfy.latent_formats
    import comfy.model_patcher
    base_model.latent_format = comfy.latent_formats.SD15(scale_factor=1.0)
    device = torch.device(device)
    return comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=device)


def sample_latents(model, noise: torch.Tensor, positive: list, negative: list, steps: int, cfg: float,
                   sampler: str, scheduler: str, latent: torch.Tensor | None = None) -> torch.Tensor:
    """KSampler on a batch of latents: txt2img from `noise` (latent None), or continuing from
    `latent` with zero noise (KSamplerAdvanced with add_noise disabled)."""
    import comfy.sample
    latent = torch.zeros_like(noise) if latent is None else latent
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   disable_pbar=True, seed=0).float()
