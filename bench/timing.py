"""Timing of a sampling step and of its labelled regions, read back from torch.profiler.

The regions are torch.profiler `record_function` labels:

    moa.layer, moa.router,     put there by the pack's MoA layer (moa_attention/engine/layer.py):
    moa.expert, moa.mix        the whole layer, its router, its expert (projections + personal
                               attention) and the blend of the expert into the prior's output
    bench.attention_layer      ComfyUI's own CrossAttention, through forward pre/post hooks on
                               its instances (the unpatched model's attention layers)
    bench.attention_kernel     ComfyUI's attention function, through its public
                               `optimized_attention_override` transformer option: the prior's
                               kernel, and the personal one when it lies inside moa.expert
    bench.diffusion_model      the outermost DIFFUSION_MODEL wrapper: the UNet and every wrapper
    bench.unet                 the innermost one: the UNet alone (the gap is MoA's own wrapper)

The step is timed by an APPLY_MODEL wrapper (wall and process CPU seconds). Only labels and
ComfyUI's wrapper/override hooks are used: no method of the pack is wrapped or replaced.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MOA_LAYER, ROUTER, EXPERT, MIX = "moa.layer", "moa.router", "moa.expert", "moa.mix"
PRIOR_LAYER = "bench.attention_layer"
KERNEL = "bench.attention_kernel"
WRAPPED_UNET, BARE_UNET = "bench.diffusion_model", "bench.unet"
LABELS = {MOA_LAYER, ROUTER, EXPERT, MIX, PRIOR_LAYER, KERNEL, WRAPPED_UNET, BARE_UNET}
LAYER_LABELS = {MOA_LAYER, PRIOR_LAYER}


def labelled(label: str):
    """A ComfyUI wrapper (executor first) that runs the rest of the chain inside `label`."""
    def wrapper(executor, *args, **kwargs):
        with record_function(label):
            return executor(*args, **kwargs)
    return wrapper


def label_module(module: torch.nn.Module, label: str) -> None:
    """Every forward of this module instance runs inside `label` (forward pre/post hooks)."""
    open_labels: list = []

    def enter(_module, _args):
        rf = record_function(label)
        rf.__enter__()
        open_labels.append(rf)

    def leave(_module, _args, _output):
        open_labels.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class StepInstruments:
    """The bench's hooks on the models it samples, and the per-UNet-call timings they record."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def attach_to_base(self, base) -> None:
        """On the unpatched ModelPatcher, before the MoA clones are made (they inherit it all)."""
        import comfy.ldm.modules.attention as comfy_attn
        from comfy.patcher_extension import WrappersMP
        for module in base.get_model_object("diffusion_model").modules():
            if isinstance(module, comfy_attn.CrossAttention):
                label_module(module, PRIOR_LAYER)
        options = base.model_options.setdefault("transformer_options", {})
        options["optimized_attention_override"] = self._labelled_kernel
        base.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench.outer", labelled(WRAPPED_UNET))
        base.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench.step", self._step_timer)

    @staticmethod
    def attach_to_config(model) -> None:
        """On each configuration last: ComfyUI runs wrappers in the order they were added, so this
        one runs inside MoA's."""
        from comfy.patcher_extension import WrappersMP
        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "bench.inner", labelled(BARE_UNET))

    @staticmethod
    def _labelled_kernel(attention, *args, **kwargs):
        with record_function(KERNEL):
            return attention(*args, **kwargs)

    def _step_timer(self, executor, x, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = executor(x, *args, **kwargs)
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        self.calls.append({"s": time.perf_counter() - t, "cpu": time.process_time() - c, "batch": int(x.shape[0]),
                           "cond_or_uncond": list(options.get("cond_or_uncond") or [])})
        return out


@dataclass
class Regions:
    """Seconds spent in each labelled region over one profiled block (every UNet call in it)."""
    wrapped_unet: float = 0.0       # bench.diffusion_model
    bare_unet: float = 0.0          # bench.unet
    layers: float = 0.0             # attention layers, whole forward (prior or MoA)
    prior_kernel: float = 0.0       # attention kernels outside moa.expert
    personal_kernel: float = 0.0    # attention kernels inside moa.expert
    router: float = 0.0
    expert: float = 0.0
    mix: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def moa_wrapper(self) -> float:
        """MoA's DIFFUSION_MODEL wrapper (its call state), between the bench's outer and inner ones."""
        return max(self.wrapped_unet - self.bare_unet, 0.0)

    @classmethod
    def from_profile(cls, prof) -> "Regions":
        r = cls()
        for ev in prof.events():
            if ev.name not in LABELS:
                continue
            above = set()
            parent = ev.cpu_parent
            while parent is not None:
                above.add(parent.name)
                parent = parent.cpu_parent
            group = LAYER_LABELS if ev.name in LAYER_LABELS else {ev.name}
            if above & group:           # nested in its own kind: counted with the outer one
                continue
            s = ev.time_range.elapsed_us() * 1e-6
            r.counts[ev.name] = r.counts.get(ev.name, 0) + 1
            if ev.name in LAYER_LABELS:
                r.layers += s
            elif ev.name == KERNEL:
                if EXPERT in above:
                    r.personal_kernel += s
                else:
                    r.prior_kernel += s
            else:
                attr = {WRAPPED_UNET: "wrapped_unet", BARE_UNET: "bare_unet", ROUTER: "router",
                        EXPERT: "expert", MIX: "mix"}[ev.name]
                setattr(r, attr, getattr(r, attr) + s)
        return r


@contextmanager
def _kineto_quiet():
    """Kineto writes a line to stderr at every profiler start and stop (and an error about
    the missing GPU on CPU-only machines), whatever KINETO_LOG_LEVEL says: drop fd 2 meanwhile."""
    import sys
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class profiled:
    """`with profiled() as p: ...`, then p.regions and p.n_events (torch.profiler, CPU only)."""

    def __enter__(self) -> "profiled":
        self._prof = profile(activities=[ProfilerActivity.CPU])
        with _kineto_quiet():
            self._prof.__enter__()
        self.regions: Regions | None = None
        self.n_events = 0
        return self

    def __exit__(self, *exc) -> None:
        with _kineto_quiet():
            self._prof.__exit__(*exc)
        if exc[0] is None:
            self.regions = Regions.from_profile(self._prof)
            self.n_events = len(self._prof.events())
