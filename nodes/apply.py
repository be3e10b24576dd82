"""MoA Apply: patch a model with a MoA adapter and bind subjects to the prompt."""
from __future__ import annotations

from ..moa_attention.comfyui.models import check_image_encoder, check_model_base, check_text_encoder_base
from ..moa_attention.comfyui.patch import MAX_SPARSE_THRESHOLD, MAX_STRENGTH, apply_moa
from ..moa_attention.comfyui.subjects import build_bindings
from .common import ADAPTER_TYPE, CATEGORY, SUBJECTS_TYPE, refusals, refuse

NODE = "MoA Apply"
ROUTING = ("soft", "hard")


class MoAApply:
    DESCRIPTION = ("Adds the MoA personalized expert and router to every attention layer and encodes the prompt "
                   "with the subjects bound to their class words. Subject pixels go to the personalized expert; "
                   "the rest stays what the base model draws.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = ("The model with MoA (a clone: the input model is unchanged).",
                       "The encoded prompt. Connect it to the sampler's positive input: MoA recognises it there.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model: the base the adapter was trained on."}),
            "moa_adapter": (ADAPTER_TYPE, {"tooltip": "From MoA Adapter Loader."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder (from the same checkpoint loader)."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The image encoder the adapter was trained with "
                                                       "(CLIP ViT-L/14, from Load CLIP Vision)."}),
            "subjects": (SUBJECTS_TYPE, {"tooltip": "From MoA Subject node(s)."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                  "default": "a photo of a person at the beach",
                                  "tooltip": "The positive prompt. Each subject's class word must appear in it."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": MAX_STRENGTH, "step": 0.05,
                                   "tooltip": "How strongly subject pixels go to the personalized expert. "
                                              "0 = exactly the base model, 1 = as trained."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Step (as a fraction of the schedule) where MoA starts."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Step (as a fraction of the schedule) where MoA stops."}),
            "routing": (list(ROUTING), {"default": "soft",
                                        "tooltip": "soft: blend the experts per pixel by the router's share. hard: "
                                                   "each pixel takes one expert (faster; sharper subject edges)."}),
        }, "optional": {
            "sparse_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_SPARSE_THRESHOLD, "step": 0.001,
                                           "tooltip": "Soft routing: pixels whose personalized share is at most this "
                                                      "skip the personalized expert and keep the base model's output. "
                                                      "Faster; a skipped pixel differs from plain soft routing by at "
                                                      "most about its share. 0 = off."}),
        }}

    def apply(self, model, moa_adapter, clip, clip_vision, subjects, prompt, strength, start_percent,
              end_percent, routing, sparse_threshold=0.0):
        if not subjects:
            raise refuse(NODE, "subjects is empty. Connect a MoA Subject node")
        with refusals(NODE):        # strength and the schedule are checked by apply_moa, NaN included
            check_model_base(model, moa_adapter.config.base, getattr(moa_adapter, "name", None))
            check_text_encoder_base(clip, moa_adapter.config.base)
            check_image_encoder(clip_vision, moa_adapter.config.image_encoder, moa_adapter.config.image_dim)
            conditioning, bindings = build_bindings(clip, clip_vision, moa_adapter.adapter.fusion, prompt, subjects,
                                                    moa_adapter.config.base)
            patched = apply_moa(model, moa_adapter, bindings, strength=strength, start_percent=start_percent,
                                end_percent=end_percent, hard_routing=routing == "hard",
                                sparse_threshold=sparse_threshold)
        return (patched, conditioning)
