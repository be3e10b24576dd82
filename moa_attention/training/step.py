"""One training step: fuse the prompts, noise the latents, run the UNet with MoA, return losses.

Data order, noise and timesteps come from (seed, step, rank): a resumed run draws exactly what
the interrupted one would have drawn."""
from __future__ import annotations

import torch
from torch import nn

from ..comfyui.subjects import fused_context
from ..engine.adapter import MoAAdapter
from ..engine.call_state import STATE_KEY, CallState, MoASettings
from .capture import LossCapture
from .config import TrainConfig
from .encode import Example
from .losses import background_share, denoising_loss, object_loss, router_loss


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

    def forward(self, batch: list[Example], noise: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.alphas_cumprod.device
        x0 = torch.stack([e.latent for e in batch]).to(device)
        text = torch.stack([e.text for e in batch]).to(device)
        fused = torch.stack([fused_context(self.adapter.fusion, e.text.to(device), e.positions, e.features)
                             for e in batch])
        s_max = max(e.masks.shape[0] for e in batch)
        masks = torch.zeros(len(batch), s_max, *x0.shape[-2:], device=device)
        for i, e in enumerate(batch):
            masks[i, : e.masks.shape[0]] = e.masks.to(device)
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        capture = LossCapture([e.positions for e in batch])
        hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        state = CallState(rows=torch.arange(len(batch), device=device), personal_context=fused, regions=None,
                          latent_index=list(range(len(batch))), settings=MoASettings(), latent_hw=hw,
                          latent_batch=len(batch), observers=(capture,))
        pred = self.unet(noisy, timesteps.float(), context=text, transformer_options={STATE_KEY: state})
        captured = capture.layers
        losses = {"denoise": denoising_loss(pred, noise, masks, self.cfg.subject_loss_weight),
                  "router": router_loss(captured, masks, hw),
                  "object": object_loss(captured, masks, [e.masks.shape[0] for e in batch], hw)}
        losses["loss"] = (losses["denoise"] + self.cfg.router_loss_weight * losses["router"]
                          + self.cfg.object_loss_weight * losses["object"])
        bg, fg = background_share(captured, masks, hw)
        losses["bg_share"], losses["fg_share"] = torch.tensor(bg), torch.tensor(fg)
        return losses


def draw(step: int, rank: int, cfg: TrainConfig, n_examples: int, shape: tuple, device) -> tuple:
    """Batch indices, noise and timesteps of one step: a function of (seed, step, rank) only."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
    idx = torch.randint(0, n_examples, (cfg.batch_size,), generator=g).tolist()
    noise = torch.randn((cfg.batch_size, *shape), generator=g).to(device)
    timesteps = torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(device)
    return idx, noise, timesteps


def enable_checkpointing(diffusion_model: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint
    for module in diffusion_model.modules():
        if hasattr(module, "attn1") and hasattr(module, "ff"):        # BasicTransformerBlock
            original = module.forward

            def wrapped(*args, _f=original, **kwargs):
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            module.forward = wrapped


@torch.no_grad()
def evaluate(step_module: nn.Module, examples: list[Example], cfg: TrainConfig, device) -> dict[str, float]:
    """Losses on fixed noise and timesteps over every example: comparable before/after."""
    shape = tuple(examples[0].latent.shape)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    totals: dict[str, float] = {}
    for e in examples:
        noise = torch.randn((1, *shape), generator=g).to(device)
        timesteps = torch.tensor([250, 500, 750])[torch.randint(0, 3, (1,), generator=g)].to(device)
        for k, v in step_module([e], noise, timesteps).items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(examples)
    return totals
