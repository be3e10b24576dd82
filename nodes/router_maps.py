"""MoA Router Maps: where the router sent pixels to the subject, after sampling."""
from __future__ import annotations

import torch

from ..moa_attention.comfyui.patch import get_controller
from ..moa_attention.engine.masks import resize_mask
from ..moa_attention.engine.router_maps import heat_colors
from .common import CATEGORY, check_finite, refusals, refuse

NODE = "MoA Router Maps"

LAYER_SETS = ("all layers", "self-attention (attn1)", "cross-attention (attn2)", "input blocks",
              "middle block", "output blocks")
LATENT_SCALE = 8   # SD1.5 VAE: one latent pixel = 8x8 image pixels


def select_layers(layers: list[str], choice: str) -> list[str]:
    rules = {
        "all layers": lambda p: True,
        "self-attention (attn1)": lambda p: p.endswith("attn1"),
        "cross-attention (attn2)": lambda p: p.endswith("attn2"),
        "input blocks": lambda p: p.startswith("input_blocks."),
        "middle block": lambda p: p.startswith("middle_block."),
        "output blocks": lambda p: p.startswith("output_blocks."),
    }
    return [p for p in layers if rules[choice](p)]


class MoARouterMaps:
    DESCRIPTION = ("Shows where MoA's routers sent each pixel: to the personalized expert (subject, red) or the "
                   "base model (context, blue), averaged over the chosen layers and all sampling steps.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "overlay")
    OUTPUT_TOOLTIPS = ("Personalized share per pixel (1 = subject), at image resolution.",
                       "The share as colours, blended over 'image' when it is connected.")
    FUNCTION = "maps"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from MoA Apply that the sampler used."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output latent: connecting it makes this node run after "
                                              "sampling, and sets the map size."}),
            "layers": (list(LAYER_SETS), {"default": "all layers", "tooltip": "Which attention layers to average."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The decoded picture(s), to draw the map over: one per latent of samples, "
                                             "or one for all."}),
            "opacity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "Opacity of the colours over 'image'."}),
            "subject": ("INT", {"default": 0, "min": 0, "max": 16,
                                "tooltip": "0 = all subjects. 1, 2, ... = only that subject (in MoA Subject chain "
                                           "order); needs a region on every subject, and is 0 outside its region."}),
        }}

    def maps(self, model, samples, layers, image=None, opacity=0.5, subject=0):
        check_finite(NODE, samples=samples, image=image)
        controller = get_controller(model)
        if controller is None:
            raise refuse(NODE, "model has no MoA patch. Connect the MODEL output of MoA Apply")
        recorder = controller.recorder
        if not recorder.layers:
            raise refuse(NODE, "nothing was recorded: no sampler has run this model with a subject yet. Connect this "
                               "node's samples input to the KSampler that uses MoA Apply's model, give that sampler "
                               "MoA Apply's positive conditioning, and a start/end range that covers some steps")
        chosen = select_layers(recorder.layers, layers)
        if not chosen:
            raise refuse(NODE, f"layers '{layers}' has no attention layers in this model (it has "
                               f"{len(recorder.layers)}: {recorder.layers[0]} ...). Choose 'all layers' or another set")
        with refusals(NODE):
            share = recorder.average(chosen) if subject == 0 else recorder.subject_average(subject - 1, chosen)
        lat = samples["samples"]
        b = lat.shape[0]
        if share.shape[0] < b:
            share = torch.cat([share, torch.zeros(b - share.shape[0], *share.shape[1:])])
        size = (lat.shape[-2] * LATENT_SCALE, lat.shape[-1] * LATENT_SCALE)
        if image is not None:
            size = tuple(image.shape[1:3])
        mask = resize_mask(share[:b], size).clamp(0, 1)
        colors = heat_colors(mask)
        if image is not None:
            base = image[:, :, :, :3].cpu().float()
            if base.shape[0] not in (1, b):
                raise refuse(NODE, f"image has {base.shape[0]} pictures for {b} latents in samples: connect the VAE "
                                   f"Decode of the same sampler output (one picture per latent), or one picture "
                                   f"for all")
            if base.shape[0] != b:
                base = base[:1].expand(b, *base.shape[1:])
            colors = (1 - opacity) * base + opacity * colors
        return (mask, colors)
