"""The models the bench samples: an SD1.5 or SDXL UNet built with ComfyUI's classes (random
weights, fp32) and, from it, the configurations

    unpatched            the plain model
    soft/<expert>        MoA, soft routing, no region: every pixel of the cond row is mixed
    sparse/<expert>      (with --sparse-threshold) MoA, sparse soft routing: the expert runs only
                         for the pixels whose share is above the threshold
    hard/<expert>        MoA, hard routing, a region mask over ~30% of the image and the router
                         forced to "personal" inside it: the expert runs for those pixels only

The positive conditioning is exactly the binding's `plain` tensor, so MoA's DIFFUSION_MODEL
wrapper personalizes the cond row (the uncond row always stays prior-only). With
--router-share-profile toy, the soft and sparse configurations get a soft region whose values
follow a measured router's share distribution (see share_profile_mask), so the routers' shares
(~1 times the region) are distributed as that router's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))     # support.* (no pytest needed)

from support.runtime import COMFY_DIR, ComfyUIMissing  # noqa: E402,F401  (re-exported for bench_moa)
from support.runtime import import_comfy as _import_comfy  # noqa: E402
from support.runtime import import_pack  # noqa: E402,F401  (re-exported for bench_moa)

__all__ = ["COMFY_DIR", "ComfyUIMissing", "import_comfy", "import_pack", "unet_config", "make_adapter", "adapter_bytes",
           "region_mask", "TOY_SHARE_PROFILE", "share_profile_mask", "Conditioning", "make_conditioning", "build_configs"]


def import_comfy():
    """ComfyUI in-process, as tests/conftest.py does (CPU, SDPA attention), without progress bars."""
    nodes = _import_comfy()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return nodes


def unet_config(quick: bool, base: str = "sd15") -> dict:
    """comfy/model_detection.py's SD15 dict (the real SD1.5 UNet, 859.5M params) without dtype,
    or with --quick a tiny one (model_channels 32, 2 levels); with base "sdxl" its SDXL dict
    (the real SDXL base UNet, 2.57B params) or test_sdxl.py's tiny SDXL-shaped one."""
    from support.model_factory import sdxl_unet_config, tiny_sdxl_unet_config, tiny_unet_config
    if base == "sdxl":
        return tiny_sdxl_unet_config() if quick else sdxl_unet_config()
    if quick:
        return tiny_unet_config(model_channels=32, levels=2, transformer_depth_middle=True)
    cfg = tiny_unet_config(model_channels=320, levels=4, transformer_depth_middle=True)
    cfg.update(num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    return cfg


def adapter_bytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in list(adapter.parameters()) + list(adapter.buffers()))


def make_adapter(diffusion_model, expert: str, rank: int, seed: int):
    """A fresh adapter, perturbed so it is not the identity: expert weights moved, routers
    biased towards the personal expert (share ~0.9997 everywhere)."""
    import torch
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    adapter = init_adapter_from_unet(diffusion_model, expert=expert, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lw in adapter.layers.values():
            lw.router.fc2.weight.normal_(0.0, 1e-3, generator=g)
            lw.router.fc2.bias.copy_(torch.tensor([0.0, 8.0]))
            for p in lw.expert.proj.values():
                if expert == "lowrank":
                    p.up.weight.normal_(0.0, 0.01, generator=g)
                else:
                    p.weight.add_(torch.randn(p.weight.shape, generator=g) * 0.01 * float(p.weight.std()))
    adapter.eval().requires_grad_(False)
    return adapter


def region_mask(latent: int, fraction: float):
    """[H, W] latent-space mask: a rectangle of a x b cells on an 8 x 8 grid, a*b/64 closest to
    `fraction` (0.3 -> 4 x 5 = 31.25%). With latent % 8 == 0 every UNet level of a 64-latent
    (64, 32, 16, 8) sees exactly the same share after area pooling, so hard routing sends the
    same fraction of pixels to the expert in every layer."""
    import torch
    m = torch.zeros(latent, latent)
    if latent % 8:
        m[: max(1, round(latent * fraction))] = 1.0
        return m
    a, b = min(((a, b) for a in range(1, 9) for b in range(a, 9)), key=lambda ab: abs(ab[0] * ab[1] / 64 - fraction))
    u = latent // 8
    m[: a * u, : b * u] = 1.0
    return m


#: A trained router's share distribution (the toy world's adapter sampled through ComfyUI, over
#: pixels, layers and steps): (share, fraction of pixels above it), from the largest fraction down
TOY_SHARE_PROFILE = ((0.001, 0.86), (0.01, 0.54), (0.05, 0.32))


def share_profile_mask(latent: int, profile=TOY_SHARE_PROFILE, seed: int = 0):
    """[H, W] latent-space soft region on an 8 x 8 grid of cells (so every UNet level sees the same
    values, as region_mask), the cells' values spread so that the fraction of cells above each
    share of `profile` is that share's fraction: log-linear between the profile's points, 1e-4
    below the lowest and up to 1.0 for the most personalized cells; cells shuffled with `seed`."""
    import numpy as np
    import torch
    exceed = (np.arange(64) + 0.5) / 64                         # fraction of cells above cell k's value
    points = sorted([(0.0, 1.0), *((f, v) for v, f in profile), (1.0, 1e-4)])
    values = 10 ** np.interp(exceed, [f for f, _ in points], [np.log10(v) for _, v in points])
    cells = torch.tensor(values, dtype=torch.float32)[torch.randperm(64, generator=torch.Generator().manual_seed(seed))]
    u = max(latent // 8, 1)
    m = cells.reshape(8, 8).repeat_interleave(u, 0).repeat_interleave(u, 1)
    return torch.nn.functional.pad(m, (0, max(latent - m.shape[1], 0), 0, max(latent - m.shape[0], 0)),
                                   value=float(values[-1]))[:latent, :latent]


@dataclass
class Conditioning:
    plain: object           # [77, D] what the sampler's positive prompt is (D: 768, SDXL 2048)
    fused: object           # [77, D] the same prompt with two "subject" tokens changed
    positive: list          # ComfyUI CONDITIONING
    negative: list
    region: object          # [latent, latent] hard routing's region
    soft_region: object = None  # [latent, latent] soft/sparse routing's share profile; None = share ~1 everywhere


def make_conditioning(latent: int, personal_fraction: float, share_profile: str = "uniform",
                      base: str = "sd15") -> Conditioning:
    """Positive == binding.plain exactly (so MoA matches the cond row); negative another prompt;
    share_profile "toy" gives soft routing TOY_SHARE_PROFILE's shares, "uniform" none. On SDXL
    the prompts are 2048 wide and carry a pooled output, as CLIPTextEncode's do."""
    import torch
    g = torch.Generator().manual_seed(123)
    width = 2048 if base == "sdxl" else 768
    plain = torch.randn(77, width, generator=g)
    fused = plain.clone()
    fused[5:7] += torch.randn(2, width, generator=g)
    negative = torch.randn(1, 77, width, generator=g)

    def extra() -> dict:
        return {"pooled_output": torch.randn(1, 1280, generator=g)} if base == "sdxl" else {}
    soft_region = share_profile_mask(latent) if share_profile == "toy" else None
    return Conditioning(plain, fused, [[plain[None].clone(), extra()]], [[negative, extra()]],
                        region_mask(latent, personal_fraction), soft_region)


def build_configs(base, adapters: dict, cond: Conditioning, instruments, sparse_threshold: float = 0.0) -> dict:
    """name -> ModelPatcher: `unpatched`, then soft/<expert>, sparse/<expert> (sparse_threshold > 0)
    and hard/<expert> per adapter, each a clone of `base` carrying the bench's instruments (see
    timing.StepInstruments)."""
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa
    instruments.attach_to_base(base)
    configs = {"unpatched": base.clone()}
    for ex, adapter in adapters.items():
        loaded = LoadedAdapter(adapter, f"bench-{ex}")
        soft = [SubjectBinding(cond.plain, cond.fused, cond.soft_region)]
        configs[f"soft/{ex}"] = apply_moa(base, loaded, soft)
        if sparse_threshold > 0:
            configs[f"sparse/{ex}"] = apply_moa(base, loaded, soft, sparse_threshold=sparse_threshold)
        configs[f"hard/{ex}"] = apply_moa(base, loaded, [SubjectBinding(cond.plain, cond.fused, cond.region)],
                                          hard_routing=True)
    for model in configs.values():
        instruments.attach_to_config(model)
    return configs
