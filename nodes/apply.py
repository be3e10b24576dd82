"""MoA Apply: patch a model with a MoA adapter and bind subjects to the prompt."""
from __future__ import annotations

from ..moa_attention.adapter_io import AdapterFileError
from ..moa_attention.comfy_patch import MAX_STRENGTH, apply_moa
from ..moa_attention.comfy_prompt import SubjectInput, build_bindings, image_feature_dim
from ..moa_attention.prompt_tokens import ClassWordError
from ..moa_attention.subject_images import SubjectImageError
from .common import ADAPTER_TYPE, CATEGORY, SUBJECTS_TYPE

ROUTING = ("soft", "hard")


def check_sd15(model) -> None:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    unet = getattr(cfg, "unet_config", {}) or {}
    if unet.get("context_dim") != 768 or unet.get("in_channels", 4) != 4 or unet.get("adm_in_channels"):
        name = type(cfg).__name__ if cfg is not None else type(model).__name__
        raise ValueError(f"MoA Apply: model is {name} (context_dim {unet.get('context_dim')}); MoA adapters run on "
                         f"SD1.5 models. Load an SD1.5 checkpoint")


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
            "model": ("MODEL", {"tooltip": "An SD1.5 model."}),
            "moa_adapter": (ADAPTER_TYPE, {"tooltip": "From MoA Adapter Loader."}),
            "clip": ("CLIP", {"tooltip": "The SD1.5 text encoder (from the checkpoint loader)."}),
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
        }}

    def apply(self, model, moa_adapter, clip, clip_vision, subjects, prompt, strength, start_percent,
              end_percent, routing):
        if clip is None:
            raise ValueError("MoA Apply: clip is None: the checkpoint has no text encoder. Load an SD1.5 "
                             "checkpoint that includes CLIP, or add a CLIP loader")
        if not subjects:
            raise ValueError("MoA Apply: subjects is empty. Connect a MoA Subject node")
        if routing not in ROUTING:
            raise ValueError(f"MoA Apply: routing must be one of {ROUTING}, got {routing!r}")
        if start_percent > end_percent:
            raise ValueError(f"MoA Apply: start_percent ({start_percent}) is after end_percent ({end_percent})")
        check_sd15(model)
        cfg = moa_adapter.config
        dim = image_feature_dim(clip_vision)
        if dim is not None and dim != cfg.image_dim:
            raise ValueError(f"MoA Apply: clip_vision gives {dim}-d image embeddings, but the adapter expects "
                             f"{cfg.image_encoder} ({cfg.image_dim}-d). Load the CLIP ViT-L/14 vision model "
                             f"(e.g. clip_vision_vit_l14.safetensors) in Load CLIP Vision")
        name = getattr(moa_adapter, "name", "adapter")
        inputs = [SubjectInput(s.images, s.masks, s.class_word, s.region) for s in subjects]
        try:
            conditioning, bindings = build_bindings(clip, clip_vision, moa_adapter.fusion, prompt, inputs)
            patched = apply_moa(model, moa_adapter, bindings, strength=strength, start_percent=start_percent,
                                end_percent=end_percent, hard_routing=routing == "hard", adapter_name=name)
        except (ClassWordError, SubjectImageError, AdapterFileError) as e:
            raise ValueError(f"MoA Apply: {e}") from None
        return (patched, conditioning)
