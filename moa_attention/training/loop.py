"""The MoA training loop, on the same MoAAttention/MoAAdapter modules the nodes run.

The frozen encoders run once, before the loop (encode.py), so each step only runs the UNet
with its MoA layers (step.py). Rank 0 writes everything: log, checkpoints, samples, adapter.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..comfyui.adapters import LoadedAdapter
from ..comfyui.loading import load_clip_vision, load_sd15_checkpoint, require_file
from ..comfyui.sampling import alphas_cumprod
from ..engine.adapter import MoAAdapter, init_adapter_from_unet
from ..engine.adapter_file import load_adapter, save_adapter
from ..engine.attention_fn import sdpa_attention
from ..engine.layer import install_layers
from .checkpoints import STATE_FILE, checkpoint_dirs, load_trainer_state, save_checkpoint
from .config import TrainConfig
from .dataset import read_manifest
from .encode import Example, encoded_examples
from .sampling import write_sample
from .step import AUROC_MAX_T, MoATrainStep, draw, enable_checkpointing, evaluate

LOG_FIELDS = ["step", "loss", "denoise", "router", "subject_route", "object", "effect", "subject_x0", "effect_x0",
              "bg_share", "fg_share", "share_auroc", "lr", "seconds"]


# ----------------------------------------------------------------------------- setup

def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def prepare_output(cfg: TrainConfig, rank: int) -> None:
    """Refuse a non-empty output folder unless --resume (continue) or --force (start over)."""
    out = cfg.output_dir
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.resume:
        if not cfg.force:
            raise SystemExit(f"{out} is not empty: pass --resume to continue that run or --force to start over "
                             f"(which deletes its checkpoints, samples and log)")
        for child in ("checkpoints", "samples", "loss_log.csv", "adapter.safetensors", "config.json", "summary.json"):
            p = out / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(parents=True, exist_ok=True)


def _load_comfy(cfg: TrainConfig):
    for label, path in (("--base", cfg.base), ("--clip-vision", cfg.clip_vision)):
        require_file(path, label)         # both, before minutes of loading
    model, clip, vae = load_sd15_checkpoint(cfg.base, "--base")
    return model, clip, vae, load_clip_vision(cfg.clip_vision, "--clip-vision")


# ----------------------------------------------------------------------------- the loop

def run(cfg: TrainConfig) -> int:
    """The command line's run: load the checkpoint with ComfyUI, encode the dataset (cached),
    then train_adapter() on it."""
    rank, world, local_rank = _dist_info()
    device = _device(cfg, local_rank)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prepare_output(cfg, rank)
    records, problems = read_manifest(cfg.data)
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:50])
        raise SystemExit(f"dataset {cfg.data} has {len(problems)} problem(s); fix them first "
                         f"(python -m moa_attention.training.dataset {cfg.data}):\n{listing}")

    model, clip, vae, clip_vision = _load_comfy(cfg)
    examples = encoded_examples(cfg, records, model, clip, vae, clip_vision, show=rank == 0)
    loaded: dict[int, LoadedAdapter] = {}

    def sampler(adapter: MoAAdapter, step: int) -> None:
        if id(adapter) not in loaded:                      # one ModelPatcher for every sample
            loaded[id(adapter)] = LoadedAdapter(adapter, "training")
        write_sample(cfg, model, vae, loaded[id(adapter)], examples[0], step, device)
    return train_adapter(cfg, model.model.diffusion_model, alphas_cumprod(model.model), examples, device,
                         sampler=sampler)


Sampler = Callable[[MoAAdapter, int], None]


def train_adapter(cfg: TrainConfig, diffusion_model: nn.Module, alphas_cumprod: torch.Tensor,
                  examples: list[Example], device: torch.device | str, sampler: Sampler | None = None,
                  eval_examples: list[Example] | None = None) -> int:
    """Train (or --resume) a MoA adapter on pre-encoded examples: the loop `run` drives, callable
    directly (the toy-world experiment does) with any SD1.5-architecture diffusion model and its
    alphas_cumprod. Writes everything run() writes into cfg.output_dir (rank 0). `sampler(adapter,
    step)` writes a sample at every multiple of cfg.sample_every (when set); it must leave the UNet
    and the adapter on `device` (ComfyUI's sampler moves them). eval_examples (default: examples)
    are what evaluate() measures into summary.json before and after.
    Returns 0, or 130 when interrupted (a checkpoint is kept)."""
    from tqdm import tqdm

    rank, world, _ = _dist_info()
    device = torch.device(device)
    own_group = False
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    torch.manual_seed(cfg.seed)
    if rank == 0:
        (cfg.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "samples").mkdir(parents=True, exist_ok=True)
    diffusion_model = diffusion_model.to(device)
    diffusion_model.requires_grad_(False)        # ComfyUI leaves requires_grad on: the prior must stay frozen
    diffusion_model.eval()

    checkpoints = checkpoint_dirs(cfg.output_dir) if cfg.resume else []
    if cfg.resume and not checkpoints and rank == 0:
        print(f"--resume: no checkpoint in {cfg.output_dir / 'checkpoints'} yet, starting from a fresh adapter")
    if checkpoints:
        adapter = load_adapter(checkpoints[-1] / "adapter.safetensors")
        adapter.requires_grad_(True)
    else:
        adapter = init_adapter_from_unet(diffusion_model, expert=cfg.expert, rank=cfg.rank, seed=cfg.seed,
                                         router_margin=cfg.router_margin)
    adapter.config.training = {k: str(v) for k, v in asdict(cfg).items()}
    adapter.to(device).train()
    uninstall = install_layers(diffusion_model, adapter, sdpa_attention)
    if cfg.gradient_checkpointing:
        enable_checkpointing(diffusion_model)

    step_module: nn.Module = MoATrainStep(adapter, diffusion_model, alphas_cumprod, cfg).to(device)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    params = [p for p in adapter.parameters() if p.requires_grad]
    names = {i: n for i, (n, p) in enumerate((n, p) for n, p in adapter.named_parameters() if p.requires_grad)}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if checkpoints:
        start = load_trainer_state(checkpoints[-1] / STATE_FILE, optimizer, names)
    if rank == 0:
        (cfg.output_dir / "config.json").write_text(json.dumps(adapter.config.training, indent=2))

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
    log_path = cfg.output_dir / "loss_log.csv"
    log_file = None
    if rank == 0:
        new_log = not log_path.exists() or not cfg.resume
        log_file = open(log_path, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
        if new_log:
            writer.writeheader()
    shape = tuple(examples[0].latent.shape)
    plain_step = step_module.module if hasattr(step_module, "module") else step_module
    eval_set = eval_examples or examples
    eval_before = evaluate(plain_step, eval_set, cfg, device) if rank == 0 else {}
    bar = tqdm(total=cfg.steps, initial=start, desc="training", disable=rank != 0)
    step = start
    t0 = time.time()
    try:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx, noise, timesteps = draw(step * cfg.grad_accum + micro, rank, cfg, len(examples), shape, device,
                                             world)
                with autocast():
                    losses = step_module([examples[i] for i in idx], noise, timesteps)
                loss = losses["loss"] / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if world > 1:
                totals = _mean_over_ranks(totals, device)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", bg=f"{totals['bg_share']:.3f}",
                            fg=f"{totals['fg_share']:.3f}", auroc=f"{totals['share_auroc']:.2f}")
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                writer.writerow({"step": step, **{k: f"{totals[k]:.6g}" for k in LOG_FIELDS if k in totals},
                                 "lr": cfg.lr, "seconds": f"{time.time() - t0:.2f}"})
                log_file.flush()
            if rank == 0 and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(cfg.output_dir, adapter, optimizer, names, step, cfg.keep_checkpoints)
            if rank == 0 and sampler and cfg.sample_every and step % cfg.sample_every == 0:
                sampler(adapter, step)
            if not math.isfinite(totals["loss"]):
                raise SystemExit(f"loss became {totals['loss']} at step {step}: lower --lr or use --mixed-precision no")
    except KeyboardInterrupt:
        if rank == 0:
            d = save_checkpoint(cfg.output_dir, adapter, optimizer, names, step, cfg.keep_checkpoints)
            print(f"\ninterrupted at step {step}: checkpoint kept in {d}; continue with --resume")
        uninstall()
        return 130
    finally:
        bar.close()
        if log_file:
            log_file.close()
    try:
        if rank == 0:
            _finish(cfg, adapter, optimizer, names, step, plain_step, eval_set, eval_before, device, world)
        if own_group:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
    finally:
        uninstall()          # the caller's diffusion model is left as it came
    return 0


def _mean_over_ranks(totals: dict[str, float], device: torch.device) -> dict[str, float]:
    """The logged numbers averaged over the processes: with every loss a mean over examples, the
    mean over ranks of equal batches is the global batch's value."""
    import torch.distributed as dist
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _finish(cfg: TrainConfig, adapter, optimizer, names, step: int, plain_step, eval_set, eval_before, device,
            world: int) -> None:
    """Rank 0 after the last step: final checkpoint, adapter file, summary.json."""
    if not cfg.checkpoint_every or step % cfg.checkpoint_every:
        save_checkpoint(cfg.output_dir, adapter, optimizer, names, step, cfg.keep_checkpoints)
    final = save_adapter(adapter, cfg.output_dir / "adapter.safetensors", overwrite=True)
    summary = {"steps": step, "world_size": world, "global_batch": cfg.batch_size * world * cfg.grad_accum,
               "eval_before": eval_before,
               "eval_after": evaluate(plain_step, eval_set, cfg, device)}
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    after = summary["eval_after"]
    print(f"wrote {final} after {step} steps; eval loss {eval_before.get('loss', float('nan')):.4f} -> "
          f"{after['loss']:.4f}; personalized share inside/outside the subjects {after['fg_share']:.3f}/"
          f"{after['bg_share']:.3f}, share AUROC vs mask {after['share_auroc']:.3f} (t <= {AUROC_MAX_T}), "
          f"change of eps inside/outside {after['change_in']:.4f}/{after['change_out']:.4f}")
