"""DDIM inversion as a ComfyUI SAMPLER, so it plugs into the stock custom-sampling nodes.

ComfyUI's custom sampling composes a MODEL + conditioning (a guider), a SAMPLER (how to step)
and SIGMAS (the schedule). The inversion is a KSAMPLER whose function walks the sigmas upwards
(engine.inversion): SamplerCustom with add_noise off, this sampler and the sigmas that the
regeneration will use turns a photo's latent into the noise that KSamplerAdvanced (add_noise
disabled, same steps and scheduler, sampler euler or ddim) or SamplerCustom (euler, same sigmas)
turns back into the photo. KSAMPLER adds zero noise (noise_scaling of an empty noise is the
latent itself for SD1.5's eps models) and process_latent_in/out are applied by the guider.
"""
from __future__ import annotations

import torch

from ..engine.errors import MoAError, MoAInputError
from ..engine.finite import require_finite
from ..engine.inversion import ddim_invert, renoise_region
from ..engine.masks import resize_mask
from .patch import get_controller


def _check_sampled(model, x: torch.Tensor, label: str | None) -> None:
    """What SamplerCustom hands the inversion: the prior model (the guider's ModelPatcher, found
    through the KSAMPLER's wrapper) and a finite latent. `label` leads the message (the node)."""
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    try:
        if patcher is not None:
            check_prior_model(patcher)
        require_finite("the latent to invert", x)
    except MoAError as e:
        raise (e if label is None else e.with_prefix(label)) from None


def inversion_sampler(refine: int = 0, label: str | None = None):
    """The KSAMPLER; `label` (the node's name) leads its refusals, which surface in the sampler node."""
    import comfy.samplers

    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        _check_sampled(model, x, label)

        def denoise(at, sigma):
            return model(at, sigma, **extra_args)

        def progress(i, at, sigma):
            if callback is not None:
                callback({"x": at, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": at})

        return ddim_invert(denoise, x, sigmas, refine=refine, callback=progress)

    return comfy.samplers.KSAMPLER(invert)


def check_prior_model(model) -> None:
    """Inversion must run the prior: MoA on the model would invert towards the subject."""
    if get_controller(model) is not None:
        raise MoAInputError("model carries a MoA patch; invert with the prior: connect the checkpoint's MODEL "
                            "(not MoA Apply's)")


def invert_latent(model, positive, negative, latent: dict, steps: int, scheduler: str, cfg: float,
                  refine: int = 0, region: torch.Tensor | None = None, renoise: float = 0.0, seed: int = 0) -> dict:
    """The LATENT of the inverted noise for `steps` steps of `scheduler` (what KSamplerAdvanced with
    add_noise disabled continues from). `region` (a MASK, [B or 1, H, W] at the picture's or the
    latent's size) and `renoise` > 0: fresh noise (from `seed`) blended in there, see
    engine.inversion.renoise_region."""
    import comfy.sample
    import comfy.samplers

    if int(steps) < 1:
        raise MoAInputError(f"steps must be at least 1, got {steps}")
    check_prior_model(model)
    mask = _renoise_mask(region, float(renoise), latent["samples"].shape[0]) if renoise else None  # before inverting
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    noise = torch.zeros_like(samples)
    inverted = comfy.sample.sample_custom(model, noise, cfg, inversion_sampler(refine), sigmas, positive, negative,
                                          samples, disable_pbar=True, seed=0)
    if mask is not None:
        inverted = renoise_region(inverted, resize_mask(mask, inverted.shape[-2:]), float(renoise), float(sigmas[0]),
                                  torch.Generator().manual_seed(int(seed)))
    out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    out["samples"] = inverted
    return out


def _renoise_mask(region: torch.Tensor | None, amount: float, photos: int) -> torch.Tensor:
    """The subject mask renoise needs, [B or 1, H, W]; refused by name when missing or unusable."""
    if region is None:
        raise MoAInputError(f"renoise {amount} needs subject_mask: the old subject's mask in the photo (where the new "
                            f"subject goes); without it set renoise to 0")
    require_finite("subject_mask", region)
    mask = region if region.ndim == 3 else region.reshape(-1, *region.shape[-2:])
    if mask.shape[0] not in (1, photos):
        raise MoAInputError(f"subject_mask has a batch of {mask.shape[0]} for {photos} photo(s): give one mask, or "
                            f"one per photo")
    return mask
