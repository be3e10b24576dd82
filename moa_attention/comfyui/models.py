"""What MoA accepts from ComfyUI's model objects: a UNet and a CLIP text encoder of the adapter's
base model (engine.bases) and a CLIP vision encoder of the adapter's width. Each check lives
here once; the nodes and the trainer call the same functions, so they refuse the same things
with the same words."""
from __future__ import annotations

import torch

from ..engine.adapter import IMAGE_ENCODER_NAMES
from ..engine.bases import BASES, SD15, SDXL_REFINER, Base, base_of_text_streams, base_of_unet, supported_labels
from ..engine.errors import ModelMismatchError

SD15_CONTEXT_DIM = SD15.context_dim
#: the groups ComfyUI's UNet builds every GroupNorm with
COMFYUI_NORM_GROUPS = 32


def _unet_config(model) -> tuple[str, dict]:
    base = getattr(model, "model", model)
    cfg = getattr(base, "model_config", None)
    name = type(cfg).__name__ if cfg is not None else type(model).__name__
    return name, getattr(cfg, "unet_config", {}) or {}


def model_base(model) -> Base | None:
    """The known base of a ModelPatcher (MODEL) or the BaseModel inside it; None for others
    (SD2, SD3, inpainting UNets, ...)."""
    _, unet = _unet_config(model)
    if unet.get("in_channels", 4) != 4:
        return None
    return base_of_unet(unet.get("context_dim"), unet.get("adm_in_channels"))


def check_model_base(model, base: str = SD15.name, adapter_name: str | None = None) -> Base:
    """Refuse a model that is not of `base` (the adapter's, named `adapter_name`), or one this
    pack cannot run MoA on, naming both bases. Returns the model's base."""
    expected = BASES[base]
    name, unet = _unet_config(model)
    found = model_base(model)
    supported = supported_labels()
    if found is None:
        extra = f", in_channels {unet.get('in_channels')}" if unet.get("in_channels", 4) != 4 else ""
        raise ModelMismatchError(f"model is {name} (context_dim {unet.get('context_dim')}{extra}); MoA adapters run "
                                 f"on {supported} models. Load an {supported} checkpoint")
    if found is SDXL_REFINER:
        raise ModelMismatchError(f"model is {name}, the {found.describe()}: MoA does not run on the refiner, only on a "
                                 f"base model. Load an {supported} checkpoint")
    if found is not expected:
        who = f"the adapter '{adapter_name}' was trained on" if adapter_name else "MoA here runs on"
        raise ModelMismatchError(f"model is {name}, an {found.describe()} model, but {who} {expected.label}. "
                                 f"Load an {expected.label} checkpoint, or use an adapter trained on {found.label}")
    if not found.supported:
        raise ModelMismatchError(f"model is {name}, an {found.describe()} model: this version of comfyui-moa runs "
                                 f"MoA on {supported} only. Update comfyui-moa for {found.label} support, or load an "
                                 f"{supported} checkpoint")
    return found


def check_training_base(model) -> Base:
    """What the trainer accepts as --base: a base model MoA runs on (SD1.5 or SDXL; the refiner
    and other models refused by name) that predicts the noise (eps). Returns its base."""
    found = model_base(model)
    base = check_model_base(model, found.name if found is not None and found.supported else SD15.name)
    check_prediction_type(model)
    return base


def check_prediction_type(model) -> None:
    """Refuse a model that does not predict the noise: the trainer's losses compare the UNet's
    output with the noise drawn (eps), which a v-prediction fine-tune does not output."""
    import comfy.model_base
    model_type = getattr(getattr(model, "model", model), "model_type", None)
    if model_type is comfy.model_base.ModelType.EPS:
        return
    name, _ = _unet_config(model)
    kind = getattr(model_type, "name", str(model_type))
    raise ModelMismatchError(f"model is {name} with prediction type {kind}: the trainer trains on noise-predicting "
                             f"(EPS) checkpoints only, as the SD1.5 and SDXL base releases are. Train on an EPS "
                             f"checkpoint; the adapter then runs on fine-tunes of the same base in MoA Apply")


def text_streams(clip) -> dict[str, int]:
    """The text encoders inside a CLIP object by stream name ('l', 'g', ...) with their widths."""
    streams: dict[str, int] = {}
    stage = getattr(clip, "cond_stage_model", None)
    for attr, encoder in (stage.named_children() if isinstance(stage, torch.nn.Module) else ()):
        if attr.startswith("clip_"):
            transformer = getattr(encoder, "transformer", None)
            embedding = transformer.get_input_embeddings() if hasattr(transformer, "get_input_embeddings") else None
            streams[attr[len("clip_"):]] = getattr(embedding, "embedding_dim", 0)
    return streams


def check_text_encoder_base(clip, base: str = SD15.name) -> None:
    """Refuse a CLIP whose text streams are not `base`'s (an SDXL CLIP on an SD1.5 model and
    back): the fused prompt and the model's cross-attention need exactly the base's widths."""
    expected = BASES[base]
    if clip is None:
        raise ModelMismatchError(f"clip is None: the checkpoint has no text encoder. Load an {expected.label} "
                                 f"checkpoint that includes CLIP, or add a CLIP loader")
    streams = text_streams(clip)
    if streams == dict(expected.text_streams):
        return
    found = base_of_text_streams(streams)
    parts = " + ".join(f"clip_{n} {w}" for n, w in streams.items()) or type(clip.cond_stage_model).__name__
    what = f"the {found.label} text encoder" if found else "a text encoder"
    raise ModelMismatchError(f"clip is {what} ({parts}), but MoA here needs the {expected.label} one ("
                             + " + ".join(f"clip_{n} {w}" for n, w in expected.text_streams)
                             + f"). Connect the CLIP output of the {expected.label} checkpoint's loader")


def sd15_tokenizer(clip):
    """The CLIP-L tokenizer inside an SD1.5 CLIP object; any other CLIP is refused by name."""
    check_text_encoder_base(clip, SD15.name)
    return clip.tokenizer.clip_l


def image_feature_dim(clip_vision) -> int | None:
    proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    return getattr(proj, "out_features", None)


def image_encoder_of(clip_vision, label: str = "clip_vision") -> tuple[str, int]:
    """(name, width) of a loaded CLIP vision model, as an adapter records it: a known name
    (clip_vit_l14, ...) when its width and input size are a known encoder's."""
    if clip_vision is None:
        raise ModelMismatchError(f"{label} is None. Load the CLIP ViT-L/14 vision model with Load CLIP Vision")
    dim = image_feature_dim(clip_vision)
    if not dim:
        raise ModelMismatchError(f"{label} has no image projection (visual_projection): not a CLIP vision model "
                                 f"MoA can use. Load the CLIP ViT-L/14 vision model")
    size = int(getattr(clip_vision, "image_size", 224))
    return IMAGE_ENCODER_NAMES.get((dim, size), f"clip_vision_{dim}d_{size}px"), dim


def check_image_encoder(clip_vision, image_encoder: str, image_dim: int, label: str = "clip_vision") -> None:
    if clip_vision is None:
        raise ModelMismatchError(f"{label} is None. Load the CLIP ViT-L/14 vision model with Load CLIP Vision")
    dim = image_feature_dim(clip_vision)
    if dim is not None and dim != image_dim:
        raise ModelMismatchError(f"{label} gives {dim}-d image embeddings, but the adapter expects {image_encoder} "
                                 f"({image_dim}-d). Load the image encoder the adapter was trained with (for "
                                 f"clip_vit_l14: the CLIP ViT-L/14 vision model, e.g. clip_vision_vit_l14.safetensors)")


def new_sd15_model(unet_config: dict, dtype=None, norm_groups: int = COMFYUI_NORM_GROUPS):
    """A BaseModel of the SD1.5 architecture (ComfyUI's SD15 class, eps prediction, SD1.5's noise
    schedule) with the given UNet shape, for experiments that train their own base. Its weights
    are uninitialised: ComfyUI's ops skip torch's init, so initialise them before use.

    SD1.5's GroupNorms have 32 groups of 10-40 channels; in a UNet of 32 channels, 32 groups are
    one channel each, an instance norm that a narrow base loses colours to. `norm_groups` builds
    them through ComfyUI's custom-operations hook (as quantised-model packs do) with that many
    groups instead."""
    import comfy.ops
    import comfy.supported_models
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(dtype or torch.float32, None)
    if norm_groups != COMFYUI_NORM_GROUPS:
        ops = comfy.ops.pick_operations(model_config.unet_config.get("dtype"), model_config.manual_cast_dtype,
                                        model_config=model_config)
        model_config.custom_operations = _grouped_norm_ops(ops, norm_groups)
    return model_config.get_model({})


def _grouped_norm_ops(ops: type, groups: int) -> type:
    """ComfyUI's `ops` with every GroupNorm built with `groups` groups (at most one per channel)."""
    class GroupNorm(ops.GroupNorm):
        def __init__(self, num_groups: int, num_channels: int, *args, **kwargs) -> None:
            super().__init__(min(groups, num_channels), num_channels, *args, **kwargs)

    return type(f"{ops.__name__}_groups{groups}", (ops,), {"GroupNorm": GroupNorm})
