"""What MoA accepts from ComfyUI's model objects: an SD1.5 UNet, its CLIP text encoder and a
CLIP vision encoder of the adapter's width. Each check lives here once; the nodes and the
trainer call the same functions, so they refuse the same things with the same words."""
from __future__ import annotations

from ..engine.errors import ModelMismatchError

SD15_CONTEXT_DIM = 768


def check_sd15_model(model) -> None:
    """`model`: a ModelPatcher (MODEL) or the BaseModel inside it."""
    base = getattr(model, "model", model)
    cfg = getattr(base, "model_config", None)
    unet = getattr(cfg, "unet_config", {}) or {}
    if unet.get("context_dim") != SD15_CONTEXT_DIM or unet.get("in_channels", 4) != 4 or unet.get("adm_in_channels"):
        name = type(cfg).__name__ if cfg is not None else type(model).__name__
        raise ModelMismatchError(f"model is {name} (context_dim {unet.get('context_dim')}); MoA adapters run on "
                                 f"SD1.5 models. Load an SD1.5 checkpoint")


def sd15_tokenizer(clip):
    """The CLIP-L tokenizer inside an SD1.5 CLIP object."""
    if clip is None:
        raise ModelMismatchError("clip is None: the checkpoint has no text encoder. Load an SD1.5 checkpoint that "
                                 "includes CLIP, or add a CLIP loader")
    tok = getattr(clip.tokenizer, "clip_l", None)
    if tok is None:
        raise ModelMismatchError("MoA needs an SD1.5 CLIP (text encoder 'clip_l'); this CLIP has "
                                 f"{type(clip.tokenizer).__name__}. Load the CLIP of an SD1.5 checkpoint")
    return tok


def image_feature_dim(clip_vision) -> int | None:
    proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    return getattr(proj, "out_features", None)


def check_image_encoder(clip_vision, image_encoder: str, image_dim: int) -> None:
    if clip_vision is None:
        raise ModelMismatchError("clip_vision is None. Load the CLIP ViT-L/14 vision model with Load CLIP Vision")
    dim = image_feature_dim(clip_vision)
    if dim is not None and dim != image_dim:
        raise ModelMismatchError(f"clip_vision gives {dim}-d image embeddings, but the adapter expects {image_encoder} "
                                 f"({image_dim}-d). Load the CLIP ViT-L/14 vision model (e.g. "
                                 f"clip_vision_vit_l14.safetensors) in Load CLIP Vision")


def new_sd15_model(unet_config: dict, dtype=None):
    """A BaseModel of the SD1.5 architecture (ComfyUI's SD15 class, eps prediction, SD1.5's noise
    schedule) with the given UNet shape, for experiments that train their own base. Its weights
    are uninitialised: ComfyUI's ops skip torch's init, so initialise them before use."""
    import comfy.supported_models
    import torch
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(dtype or torch.float32, None)
    return model_config.get_model({})
