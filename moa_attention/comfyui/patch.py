"""MoA installed on a ComfyUI ModelPatcher clone.

Mechanism (why each choice: docs/design.md, "How it is installed"):
- attention modules are swapped with `add_object_patch`, because MoA needs the raw hidden
  states and its own projections, which attn1/attn2 *replace* patches never see;
- the adapter is a separate ModelPatcher in `additional_models`, so ComfyUI moves and
  offloads its weights together with the UNet's;
- a DIFFUSION_MODEL wrapper decides once per UNet call which rows are personalized;
- an OUTER_SAMPLE wrapper starts a fresh router-map recording for every sampling run;
- the controller is an attachment, where the router-map node finds it.
The caller's model is never modified: everything happens on `model.clone()`.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import torch

from ..engine.adapter import MoAAdapter
from ..engine.adapter_file import check_adapter_fits
from ..engine.call_state import STATE_KEY, MoASettings
from ..engine.errors import MoAInputError
from ..engine.layer import MoAAttention
from ..engine.router_maps import RouterRecorder
from ..engine.unet_layers import LayerSpec, find_attention_layers
from .adapters import LoadedAdapter, as_loaded
from .batch import SubjectBinding, build_call_state

log = logging.getLogger("comfyui-moa")

KEY = "moa"
#: cap of the strength knob: at 3 a pixel the router gave 25% to the subject gets 50% (3s / (1 + 2s));
#: far beyond it the knob would just overrule the router everywhere it gave the subject anything
MAX_STRENGTH = 3.0
#: cap of the sparse soft routing bound: above it pixels the router gives a real part of the picture
#: would lose the subject (a skipped pixel changes by up to its share times personal - prior)
MAX_SPARSE_THRESHOLD = 0.5


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None):
    """ComfyUI's attention kernel, looked up at call time: the prior uses whatever backend the
    server was started with (--use-pytorch-cross-attention, xformers, ...), and so must MoA."""
    from comfy.ldm.modules import attention as comfy_attn
    kw: dict[str, Any] = {"attn_precision": attn_precision}
    if transformer_options is not None:
        kw["transformer_options"] = transformer_options
    if mask is None:
        return comfy_attn.optimized_attention(q, k, v, heads, **kw)
    return comfy_attn.optimized_attention_masked(q, k, v, heads, mask, **kw)


class MoAController:
    """Per-patch state shared by the wrappers, the layers and the router-map node."""

    def __init__(self, adapter: LoadedAdapter, bindings: list[SubjectBinding], settings: MoASettings) -> None:
        self.adapter = adapter
        self.bindings = bindings
        self.settings = settings
        self.adapter_name = adapter.name
        self.recorder = RouterRecorder()
        self._warned: set[str] = set()
        self._matched_this_run = False

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.recorder.reset()
        self._warned.clear()
        self._matched_this_run = False
        return executor(*args, **kwargs)

    def diffusion_model_wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = build_call_state(context, transformer_options, self.bindings, self.settings,
                                 (self.recorder,), (int(x.shape[-2]), int(x.shape[-1])), timesteps)
        if state is None:
            self._maybe_warn(context, transformer_options)
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        self._matched_this_run = True
        self._check_sequence(state.latent_batch)
        options = dict(transformer_options)
        options[STATE_KEY] = state
        return executor(x, timesteps, context, y, control, options, **kwargs)

    def _warn_once(self, key: str, message: str, *args) -> None:
        """Log `message` once per sampling run: the console says it without repeating it every step."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _maybe_warn(self, context, transformer_options) -> None:
        if self._matched_this_run or context is None:
            return
        sigmas = transformer_options.get("sigmas")
        if sigmas is not None and not self.settings.active_at(float(sigmas.reshape(-1)[0])):
            return
        if 0 not in (transformer_options.get("cond_or_uncond") or [0]):
            return
        self._warn_once("unmatched", "MoA (%s): no positive prompt in this batch is the one MoA Apply encoded, so no "
                        "subject is applied. Connect MoA Apply's CONDITIONING output to the sampler's positive "
                        "input.", self.adapter_name)

    def _check_sequence(self, latents: int) -> None:
        """A morph sequence renders only from the morph's own LATENT output: latent i gets factor
        i % K, so another latent (e.g. Empty Latent Image straight into the sampler) renders
        other factors with other noise, or only factor 0."""
        k = self.bindings[0].sequence_length if self.bindings else 1
        expected = self.bindings[0].latent_batch if self.bindings else None
        if k == 1 or latents == (expected if expected is not None else latents - latents % k):
            return
        self._warn_once("sequence", "MoA (%s): the sampler renders %d latent(s), but MoA Subject Morph made %s for "
                        "its %d factors, so the pictures are not the morph sequence. Connect MoA Subject Morph's "
                        "LATENT output to the sampler's latent_image.", self.adapter_name, latents,
                        expected if expected is not None else f"a multiple of {k}", k)


def original_attention(model, spec_path: str) -> torch.nn.Module:
    """The prior module at a path, even while this or another MoA patch holds it."""
    obj = model.get_model_object(f"diffusion_model.{spec_path}")
    while isinstance(obj, MoAAttention):
        obj = obj.prior_module
    return obj


def model_attention_layers(model) -> list[LayerSpec]:
    return find_attention_layers(model.get_model_object("diffusion_model"))


def check_settings(strength: float, start_percent: float, end_percent: float, sparse_threshold: float = 0.0) -> None:
    """MoA Apply's knobs, checked here once for the node and the Python API. NaN is refused too:
    JSON carries it and ComfyUI's min/max check lets it through."""
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise MoAInputError(f"strength must be a number in [0, {MAX_STRENGTH}], got {strength} (0 = the base model, "
                            f"1 = as trained)")
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= value <= 1.0:
            raise MoAInputError(f"{name} must be a number in [0, 1], got {value}")
    if start_percent > end_percent:
        raise MoAInputError(f"start_percent ({start_percent}) is after end_percent ({end_percent}). Make "
                            f"start_percent the smaller one")
    if not 0.0 <= sparse_threshold <= MAX_SPARSE_THRESHOLD:
        raise MoAInputError(f"sparse_threshold must be a number in [0, {MAX_SPARSE_THRESHOLD}], got "
                            f"{sparse_threshold} (0 = off: every pixel mixed by its share)")


def apply_moa(model, adapter: MoAAdapter | LoadedAdapter, bindings: list[SubjectBinding], *,
              strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0,
              hard_routing: bool = False, sparse_threshold: float = 0.0):
    """Return a clone of `model` (a ComfyUI ModelPatcher) with MoA installed; `model` is untouched.

    sparse_threshold (soft routing): pixels whose personalized share is at most this skip the
    personalized expert and keep the base model's output; 0 = off."""
    from comfy.patcher_extension import WrappersMP

    check_settings(strength, start_percent, end_percent, sparse_threshold)
    loaded = as_loaded(adapter)
    specs = model_attention_layers(model)
    check_adapter_fits(loaded.adapter, specs, loaded.name)

    m = model.clone()
    if m.get_attachment(KEY) is not None:
        log.info("MoA: replacing the MoA patch already on this model with '%s'", loaded.name)
        m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
        m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    sampling = m.get_model_object("model_sampling")
    settings = MoASettings(strength=float(strength), hard=bool(hard_routing), sparse_threshold=float(sparse_threshold),
                           sigma_start=float(sampling.percent_to_sigma(start_percent)),
                           sigma_end=float(sampling.percent_to_sigma(end_percent)))
    controller = MoAController(loaded, bindings, settings)

    m.set_additional_models(KEY, [loaded.patcher(m.load_device, m.offload_device)])
    for spec in specs:
        prior = original_attention(m, spec.path)
        m.add_object_patch(f"diffusion_model.{spec.path}",
                           MoAAttention(prior, loaded.adapter.layer(spec.path), spec.path, attention=comfy_attention))
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, controller.diffusion_model_wrapper)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, controller.outer_sample_wrapper)
    m.set_attachments(KEY, controller)
    # a clone that only differs by object patches would not be re-loaded when ComfyUI switches
    # to it from an already-loaded sibling; a new uuid makes it load (and place the adapter) once
    m.patches_uuid = uuid.uuid4()
    return m


def get_controller(model) -> MoAController | None:
    return model.get_attachment(KEY) if hasattr(model, "get_attachment") else None
