"""DDIM inversion of a photo with the prior, for subject swap: the stock samplers regenerate from it."""
from __future__ import annotations

import torch

from ..moa_attention.comfyui.inversion import invert_latent, inversion_sampler
from .common import CATEGORY, check_finite, refusals, refuse

INVERT_NODE = "MoA Invert Photo"
SAMPLER_NODE = "MoA DDIM Inversion Sampler"
MAX_REFINE = 10
REFINE_TOOLTIP = ("0 = classic DDIM inversion. Each extra iteration solves the inversion step more exactly (one more "
                  "model call per step): the reconstruction gets closer to the photo.")


def schedulers() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


class MoADDIMInversionSampler:
    DESCRIPTION = ("A SAMPLER that runs DDIM inversion: it walks the sigmas upwards, turning a clean latent into the "
                   "noise that Euler/DDIM sampling on the same sigmas turns back into it. Use it in SamplerCustom "
                   "(add_noise off, cfg 1, the base model and a prompt describing the photo), with the SIGMAS you will "
                   "regenerate with. A model from MoA Apply is refused when sampling starts (inversion runs the prior).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The inversion sampler, for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"refine": ("INT", {"default": 0, "min": 0, "max": MAX_REFINE, "tooltip": REFINE_TOOLTIP})}}

    def get_sampler(self, refine):
        return (inversion_sampler(int(refine), label=SAMPLER_NODE),)


class MoAInvertPhoto:
    DESCRIPTION = ("Subject swap, step 1: encodes a photo and inverts it to noise with DDIM inversion on the base model "
                   "(the prior) and a prompt describing the photo. Regenerate from the output with KSampler (Advanced): "
                   "add_noise disable, the same steps and scheduler, sampler euler or ddim, MoA Apply's model and "
                   "prompt. Without a subject the photo comes back; with one, the context stays the photo's.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("noise", "photo_latent")
    OUTPUT_TOOLTIPS = ("The inverted noise: KSampler (Advanced)'s latent_image, with add_noise disable.",
                       "The photo's own latent (VAE Encode), to compare with.")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (the checkpoint's MODEL, not MoA Apply's): inversion runs the "
                                           "prior."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "image": ("IMAGE", {"tooltip": "The photo; width and height must be multiples of 8."}),
            "positive": ("CONDITIONING", {"tooltip": "A prompt describing the photo (CLIP Text Encode). Use the same "
                                                     "words, with the class word, in MoA Apply's prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt; only used when cfg is not 1."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                              "tooltip": "Inversion steps; regenerate with exactly as many. More = closer reconstruction."}),
            "scheduler": (schedulers(), {"default": "normal", "tooltip": "The scheduler the regeneration uses."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Guidance while inverting. 1 (no guidance) inverts most exactly. Regenerating "
                                         "with the same cfg gives the photo back most exactly; with renoise, a higher "
                                         "cfg there (3) draws the new subject more clearly and moves the rest of the "
                                         "photo a little."}),
            "refine": ("INT", {"default": 0, "min": 0, "max": MAX_REFINE, "tooltip": REFINE_TOOLTIP}),
        }, "optional": {
            "subject_mask": ("MASK", {"tooltip": "The old subject's mask in the photo (where the new subject goes). "
                                                 "Needed when renoise is above 0; grow it a little (Grow Mask)."}),
            "renoise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                  "Fresh noise blended into the inverted noise inside subject_mask. The inverted noise "
                                  "remembers the old subject's colours and shape, and the regeneration follows them: "
                                  "raise this when the old subject comes back. 0 = the inversion as it is; 1 = fresh "
                                  "noise inside the mask. Outside the mask the inversion is kept exactly."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the fresh noise that renoise blends in."}),
        }}

    def invert(self, model, vae, image, positive, negative, steps, scheduler, cfg, refine, subject_mask=None,
               renoise=0.0, seed=0):
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise refuse(INVERT_NODE, "image must be an IMAGE batch [B, H, W, C]; connect Load Image")
        h, w = int(image.shape[1]), int(image.shape[2])
        if h % 8 or w % 8 or h < 8 or w < 8:
            raise refuse(INVERT_NODE, f"image size {w}x{h} is not a multiple of 8: the latent would crop it and the "
                                      f"photo could not come back. Resize or crop it to "
                                      f"{max(8, w // 8 * 8)}x{max(8, h // 8 * 8)} (Upscale Image / Image Crop)")
        check_finite(INVERT_NODE, image=image)
        with refusals(INVERT_NODE):     # invert_latent refuses a model carrying MoA, and a bad step count
            photo = {"samples": vae.encode(image[:, :, :, :3])}
            noise = invert_latent(model, positive, negative, photo, int(steps), scheduler, float(cfg), int(refine),
                                  subject_mask, float(renoise), int(seed))
        return (noise, photo)
