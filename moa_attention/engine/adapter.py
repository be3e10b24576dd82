"""The MoA adapter: per attention layer a router and a personalized expert, plus the fusion
MLP of the multimodal prompt. One nn.Module so that ComfyUI can load/offload it as a unit."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .bases import BASES, SDXL
from .errors import ModelMismatchError
from .experts import PersonalExpert
from .fusion import FusionMLP
from .prompt_schedule import PromptSchedule
from .router import FRESH_PRIOR_MARGIN, Router
from .unet_layers import LayerSpec, find_attention_layers, get_submodule

BASE_SD15 = "sd15"
IMAGE_ENCODER_CLIP_L14 = "clip_vit_l14"
#: the image encoders known by name, by (width of the projected embeds, input size in pixels)
IMAGE_ENCODER_NAMES = {(768, 224): IMAGE_ENCODER_CLIP_L14, (768, 336): "clip_vit_l14_336",
                       (1024, 224): "clip_vit_h14", (1280, 224): "clip_vit_bigg14"}
#: the width of each known image encoder's projected embeds
IMAGE_ENCODER_DIMS = {name: dim for (dim, _), name in IMAGE_ENCODER_NAMES.items()}


@dataclass
class AdapterConfig:
    layers: list[LayerSpec]
    expert: str = "lowrank"           # "full" or "lowrank"
    rank: int = 64                    # ignored for "full"
    base: str = BASE_SD15
    image_encoder: str = IMAGE_ENCODER_CLIP_L14
    text_dim: int = 768
    image_dim: int = 768
    fusion_hidden: int = 768
    identity_tokens: int = 1          # fused tokens per subject (fusion.py)
    prompt_schedule: bool = False     # the fused prompt conditioned on timestep and layer (prompt_schedule.py)
    training: dict = field(default_factory=dict)


def module_key(path: str) -> str:
    # nn.ModuleDict keys cannot contain dots
    return path.replace(".", "__")


def text_streams(config: AdapterConfig) -> tuple[int, ...]:
    """The widths of the text encoders side by side in the adapter's tokens: its base's streams
    (SDXL: 768 + 1280), or one stream of `text_dim` for a base model of another width."""
    base = BASES.get(config.base)
    if base is not None and base.context_dim == config.text_dim:
        return tuple(width for _, width in base.text_streams)
    return (config.text_dim,)


class MoALayerWeights(nn.Module):
    """One attention layer's router and expert. `index` (the layer's place in the adapter) and
    `schedule` (the adapter's prompt schedule, or None) let its cross-attention read the
    schedule; the schedule is held, not registered, so its weights are stored once, under the
    adapter."""

    def __init__(self, spec: LayerSpec, expert: str, rank: int, index: int = 0) -> None:
        super().__init__()
        self.index = index
        self.schedule: PromptSchedule | None = None
        self.router = Router(spec.query_dim)
        dims = {"to_q": (spec.query_dim, spec.inner_dim), "to_k": (spec.context_dim, spec.inner_dim),
                "to_v": (spec.context_dim, spec.inner_dim), "to_out": (spec.inner_dim, spec.query_dim)}
        self.expert = PersonalExpert(dims, mode=expert, rank=rank)


class MoAAdapter(nn.Module):
    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({module_key(s.path): MoALayerWeights(s, config.expert, config.rank, i)
                                     for i, s in enumerate(config.layers)})
        self.fusion = FusionMLP(config.text_dim, config.image_dim, config.fusion_hidden, text_streams(config),
                                config.identity_tokens)
        self.prompt_schedule = (PromptSchedule(len(config.layers), config.text_dim)
                                if config.prompt_schedule else None)
        for weights in self.layers.values():
            object.__setattr__(weights, "schedule", self.prompt_schedule)

    def layer(self, path: str) -> MoALayerWeights:
        return self.layers[module_key(path)]


def init_adapter_from_unet(diffusion_model: nn.Module, expert: str = "lowrank", rank: int = 64,
                           seed: int = 0, router_margin: float = FRESH_PRIOR_MARGIN, **config: object) -> MoAAdapter:
    """A fresh adapter for this UNet: personal == prior, routers favour the prior by
    `router_margin` logits, fusion is the identity on the text. The trainer starts here; tests
    use it as the exactness anchor (personal == prior makes the output the base model's at any
    margin). A UNet with SDXL's cross-attention width gets an SDXL adapter unless `config` names
    another base."""
    specs = find_attention_layers(diffusion_model)
    if not specs:
        raise ModelMismatchError("this model has no attention layers with to_q/to_k/to_v/to_out: not an SD1.5 "
                                 "or SDXL UNet")
    if "base" not in config and {s.context_dim for s in specs if s.kind == "attn2"} == {SDXL.context_dim}:
        config = {"base": SDXL.name, "text_dim": SDXL.context_dim, "fusion_hidden": SDXL.context_dim, **config}
    adapter = MoAAdapter(AdapterConfig(layers=specs, expert=expert, rank=rank, **config))
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        prior = get_submodule(diffusion_model, spec.path)
        weights = adapter.layer(spec.path)
        weights.router.reset_fresh(gen, router_margin)
        weights.expert.reset_fresh({"to_q": prior.to_q, "to_k": prior.to_k, "to_v": prior.to_v,
                                    "to_out": prior.to_out[0]}, gen)
    adapter.fusion.reset_fresh(gen)
    if adapter.prompt_schedule is not None:
        adapter.prompt_schedule.reset_fresh(gen)
    return adapter
