"""Every option of a training run, with the defaults the CLI shows."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

TIMESTEP_BIASES = ("uniform", "cubic")
RECOLOUR_OFF = 1000                              # recolour_t past the last timestep: never


def default_workers() -> int:
    """DataLoader workers decoding the dataset: up to 4, leaving a core to the encoders."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class TrainConfig:
    base: Path                                   # SD1.5 or SDXL checkpoint (.safetensors), loaded by ComfyUI
    clip_vision: Path                            # CLIP vision model (ViT-L/14), loaded by ComfyUI
    data: Path                                   # dataset folder: manifest.jsonl, or FastComposer's layout
    output_dir: Path | None                      # None only with --cache-only
    split: str = "train"                         # FastComposer layout: image_ids_<split>.txt ("all": image_ids.txt)
    coco_labels: tuple[str, ...] = ("person",)   # FastComposer layout: segments that are subjects
    max_subjects: int = 4                        # FastComposer layout: subjects per image at most
    expert: str = "lowrank"                      # "full" as in the paper; "lowrank" a rank-r delta, far smaller
    rank: int = 64
    identity_tokens: int = 1                     # fused tokens per subject (1: FastComposer's and the paper's)
    prompt_schedule: bool = False                # the fused prompt conditioned on timestep and layer (the paper's)
    resolution: int | None = None                # None: the base's (SD1.5 512 as the paper, SDXL 1024)
    batch_size: int = 1                          # per process
    grad_accum: int = 1
    lr: float = 1e-5                             # FastComposer/MoA-style fine-tuning rate
    lr_schedule: str = "constant"                # or "cosine": from lr down to 0 over the run (lr_schedule.py)
    weight_decay: float = 1e-2
    steps: int = 1000
    seed: int = 0
    mixed_precision: str = "no"                  # "no", "fp16" (CUDA), "bf16"
    gradient_checkpointing: bool = False
    # loss defaults: chosen on the toy world (why each: docs/training.md, "Losses, and why each one")
    router_loss_weight: float = 2.0              # background share (the paper's router loss)
    router_loss_power: float = 1.0               # 2 = the paper's squared form
    subject_route_weight: float = 0.3            # -log(share) on subject pixels (ours)
    object_loss_weight: float = 0.1              # FastComposer's balanced L1 on cross-attention maps
    subject_loss_weight: float = 4.0             # weight of subject pixels in the denoising loss
    background_effect_weight: float = 4.0        # |eps_moa - eps_base|^2 outside the subject (ours)
    router_margin: float = 2.0                   # a fresh router's logit margin towards the prior
    subject_x0_weight: float = 0.0               # the subject's error in x0 units at high noise (ours)
    effect_x0_weight: float = 0.0                # background_effect in x0 units (ours)
    mask_routed_weight: float = 0.0              # the expert on the subject, routed by its mask (ours)
    x0_weight_cap: float = 20.0                  # cap of (1 - abar) / abar in the x0-unit terms
    timestep_bias: str = "uniform"               # or "cubic" (T2I-Adapter's: more high-noise steps)
    recolour_t: int = RECOLOUR_OFF               # inputs at t >= this show the subject recoloured (ours)
    eval_examples: int = 32                      # examples evaluate() measures before/after
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0                        # 0 = no sample images
    sample_steps: int = 20
    log_every: int = 1
    eval_every: int = 0                          # > 0: evaluate() every N steps into eval_log.csv
    resume: bool = False
    estimate: int = 0                            # > 0: time this many steps, report the run's cost, train nothing
    cache_only: bool = False                     # fill the encoder cache (this rank's shard) and stop
    workers: int = field(default_factory=default_workers)   # DataLoader workers decoding images (0: in-process)
    force: bool = False
    device: str = "auto"
    comfyui: Path | None = None


def at_base_resolution(cfg: TrainConfig, default: int) -> TrainConfig:
    """`cfg` with its resolution, or the base model's `default` when none was given."""
    return cfg if cfg.resolution else replace(cfg, resolution=default)
