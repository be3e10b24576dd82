"""One training step: fuse the prompts, noise the latents, run the UNet with MoA, return losses.

Data order, noise and timesteps come from (seed, step) for the *global* batch, and each
process takes its own slice: N processes with batch b train on exactly what one process with
batch N*b would, and a resumed run draws exactly what the interrupted one would have drawn."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..comfyui.subjects import fused_context
from ..engine.adapter import MoAAdapter
from ..engine.call_state import STATE_KEY, CallState, MoASettings
from ..engine.fusion import identity_rows, stack_prompts
from ..scoring.metrics import auroc, change_inside_outside
from .capture import LossCapture, share_map
from .config import RECOLOUR_OFF, TrainConfig
from .encode import Example
from .losses import (background_effect_loss, background_effect_x0_loss, background_share, denoising_loss,
                     mask_routed_loss, object_loss, router_loss, subject_route_loss, subject_x0_loss)
from .recolour import corrected_target, recolour_subjects

#: routing by the subject masks alone: a strength that lifts any share above 1e-4 over one half,
#: the masks as the region, then hard routing: the expert on the subject, the prior elsewhere,
#: and no gradient to the router (a step function)
MASK_ROUTED = MoASettings(strength=1e4, hard=True)


def model_dtype(diffusion_model: nn.Module) -> torch.dtype:
    """The dtype ComfyUI runs the UNet in (UNetModel.dtype; else its first weight's)."""
    dtype = getattr(diffusion_model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(diffusion_model.parameters()).dtype


@dataclass
class Forward:
    """What one MoA forward produced, in fp32."""
    pred: torch.Tensor              # [B, 4, h, w] MoA's epsilon
    base: torch.Tensor | None       # [B, 4, h, w] the frozen base model's epsilon (no MoA), when asked
    noise: torch.Tensor             # the target: the epsilon that leads back to the true picture
    masks: torch.Tensor             # [B, S, h, w]
    captured: list
    hw: tuple[int, int]


class MoATrainStep(nn.Module):
    """The adapter is the only registered submodule, so DistributedDataParallel syncs exactly
    the trainable weights; the frozen UNet is held as a plain attribute."""

    def __init__(self, adapter: MoAAdapter, diffusion_model: nn.Module, alphas_cumprod: torch.Tensor,
                 cfg: TrainConfig) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", diffusion_model)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.cfg = cfg

    def run(self, batch: list[Example], noise: torch.Tensor, timesteps: torch.Tensor, with_base: bool,
            settings: MoASettings | None = None, mask_routed: bool = False, recolour: bool = False) -> Forward:
        device = self.alphas_cumprod.device
        x0 = torch.stack([e.latent for e in batch]).to(device).float()
        text = torch.stack([e.text for e in batch]).to(device)
        length = text.shape[1]
        fused = stack_prompts([fused_context(self.adapter.fusion, e.text.to(device), e.positions, e.features)
                               for e in batch], length)
        s_max = max(e.masks.shape[0] for e in batch)
        masks = torch.zeros(len(batch), s_max, *x0.shape[-2:], device=device)
        for i, e in enumerate(batch):
            masks[i, : e.masks.shape[0]] = e.masks.to(device)
        noise = noise.to(device).float()
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x_in = x0
        if recolour:
            later = (timesteps >= self.cfg.recolour_t).view(-1, 1, 1, 1)
            x_in = torch.where(later, recolour_subjects(x0, masks), x0)
        noisy = ac.sqrt() * x_in + (1 - ac).sqrt() * noise
        target = corrected_target(noise, x_in, x0, ac) if recolour else noise
        # as BaseModel._apply_model does: the UNet's inputs in its own dtype (ComfyUI loads SD1.5 in
        # fp16 on CUDA), the losses in fp32
        dtype = model_dtype(self.unet)
        noisy_m, text_m, t_m = noisy.to(dtype), text.to(dtype), timesteps.float()
        y = torch.stack([e.y for e in batch]).to(device, dtype) if batch[0].y is not None else None   # SDXL
        capture = LossCapture([identity_rows(e.positions, length, self.adapter.fusion.tokens) for e in batch])
        hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        if mask_routed:
            state = CallState.whole_batch(fused.to(dtype), hw, MASK_ROUTED, regions=masks.amax(dim=1, keepdim=True),
                                          timesteps=t_m)
        else:
            state = CallState.whole_batch(fused.to(dtype), hw, settings, observers=(capture,), timesteps=t_m)
        pred = self.unet(noisy_m, t_m, context=text_m, y=y, transformer_options={STATE_KEY: state}).float()
        base = None
        if with_base:
            with torch.no_grad():
                base = self.unet(noisy_m, t_m, context=text_m, y=y, transformer_options={}).float()
        return Forward(pred, base, target, masks, capture.layers, hw)

    def forward(self, batch: list[Example], noise: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        recolour = cfg.recolour_t < RECOLOUR_OFF
        f = self.run(batch, noise, timesteps, with_base=cfg.background_effect_weight > 0 or cfg.effect_x0_weight > 0,
                     recolour=recolour)
        abar = self.alphas_cumprod[timesteps]
        losses = {"denoise": denoising_loss(f.pred, f.noise, f.masks, cfg.subject_loss_weight),
                  "router": router_loss(f.captured, f.masks, f.hw, cfg.router_loss_power),
                  "subject_route": subject_route_loss(f.captured, f.masks, f.hw),
                  "object": object_loss(f.captured, f.masks, [e.masks.shape[0] for e in batch], f.hw),
                  "effect": (background_effect_loss(f.pred, f.base, f.masks) if f.base is not None
                             else f.pred.new_zeros(())),
                  "subject_x0": subject_x0_loss(f.pred, f.noise, f.masks, abar, cfg.x0_weight_cap),
                  "effect_x0": (background_effect_x0_loss(f.pred, f.base, f.masks, abar, cfg.x0_weight_cap)
                                if f.base is not None else f.pred.new_zeros(()))}
        if cfg.mask_routed_weight > 0:
            routed = self.run(batch, noise, timesteps, with_base=False, mask_routed=True, recolour=recolour)
            losses["mask_routed"] = mask_routed_loss(routed.pred, routed.noise, routed.masks, abar, cfg.x0_weight_cap)
        else:
            losses["mask_routed"] = f.pred.new_zeros(())
        losses["loss"] = (losses["denoise"] + cfg.router_loss_weight * losses["router"]
                          + cfg.subject_route_weight * losses["subject_route"]
                          + cfg.object_loss_weight * losses["object"]
                          + cfg.background_effect_weight * losses["effect"]
                          + cfg.subject_x0_weight * losses["subject_x0"]
                          + cfg.effect_x0_weight * losses["effect_x0"]
                          + cfg.mask_routed_weight * losses["mask_routed"])
        bg, fg = background_share(f.captured, f.masks, f.hw)
        losses["bg_share"], losses["fg_share"] = torch.tensor(bg), torch.tensor(fg)
        with torch.no_grad():
            union = f.masks.amax(dim=1)
            losses["share_auroc"] = torch.tensor(auroc(share_map(f.captured, f.hw), union))
        return losses


def biased_timesteps(u: torch.Tensor) -> torch.Tensor:
    """T2I-Adapter's cubic schedule t = 1000 (1 - u^3): 63% of steps at t >= 750 instead of 25%.
    The noisiest steps decide layout and colours, so a subject's identity is learned there."""
    return ((1.0 - u ** 3) * 1000).long().clamp(0, 999)


def draw(step: int, rank: int, cfg: TrainConfig, n_examples: int, shape: tuple, device, world: int = 1) -> tuple:
    """Batch indices, noise and timesteps of this process's share of one step.

    The global batch (batch_size x world) is a function of (seed, step) only; rank r takes
    rows [r*b, (r+1)*b). So world=N, batch b draws exactly what world=1, batch N*b draws."""
    b = cfg.batch_size
    total = b * world
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919)
    idx = torch.randint(0, n_examples, (total,), generator=g)
    noise = torch.randn((total, *shape), generator=g)
    timesteps = torch.randint(0, 1000, (total,), generator=g)
    if cfg.timestep_bias == "cubic":
        timesteps = biased_timesteps(torch.rand((total,), generator=g))
    mine = slice(rank * b, (rank + 1) * b)
    return idx[mine].tolist(), noise[mine].to(device), timesteps[mine].to(device)


EVAL_TIMESTEPS = (200, 400, 600, 800)
#: the share is judged where the picture's layout is still being decided but the subject is
#: visible: at t <= 600. Above it the noisy latent barely shows the subject, and even a router
#: trained on the masks separates it less well (docs/training.md, "The run folder")
AUROC_MAX_T = 600


@torch.no_grad()
def evaluate(step_module: "MoATrainStep", examples: Sequence[Example], cfg: TrainConfig, device,
             limit: int | None = None) -> dict[str, float]:
    """Losses and disentanglement numbers on fixed noise and timesteps: comparable before/after.

    - loss terms averaged over the examples (each at one of EVAL_TIMESTEPS);
    - share_auroc: the layer-averaged personalized share predicting the subject mask, pooled
      over the examples evaluated at t <= AUROC_MAX_T (0.5 = chance, what a uniform share gets);
    - fg_share / bg_share: mean share inside / outside the subjects;
    - change_in / change_out: mean |eps_moa - eps_base| inside / outside the subjects for the
      same noisy input (strength 1): where the adapter changes the prediction."""
    examples = examples[: limit or cfg.eval_examples or len(examples)]
    shape = tuple(examples[0].latent.shape)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    totals: dict[str, float] = {}
    shares, labels, diffs, regions = [], [], [], []
    for i, e in enumerate(examples):
        noise = torch.randn((1, *shape), generator=g)
        t = torch.tensor([EVAL_TIMESTEPS[i % len(EVAL_TIMESTEPS)]], device=device)
        for k, v in step_module([e], noise, t).items():
            if k != "share_auroc":
                totals[k] = totals.get(k, 0.0) + float(v) / len(examples)
        f = step_module.run([e], noise, t, with_base=True)
        union = f.masks.amax(dim=1)
        if int(t) <= AUROC_MAX_T:
            shares.append(share_map(f.captured, f.hw).cpu())
            labels.append(union.cpu())
        diffs.append((f.pred - f.base).cpu())
        regions.append(union.cpu())
    totals["share_auroc"] = auroc(torch.cat(shares), torch.cat(labels)) if shares else float("nan")
    zero = torch.zeros_like(torch.cat(diffs))
    totals["change_in"], totals["change_out"] = change_inside_outside(torch.cat(diffs), zero, torch.cat(regions))
    return totals
