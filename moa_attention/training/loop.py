"""The MoA training loop, on the same MoAAttention/MoAAdapter modules the nodes run.

The frozen encoders run once per example, before the loop, into a cache on disk (cache.py:
decoding in DataLoader workers, the encoders in this process, sharded over the processes), so
each step only reads its examples and runs the UNet with its MoA layers (step.py). Rank 0
writes everything: log, checkpoints, samples, adapter.
The caller's UNet is borrowed (unet.py): however training ends, it comes back as it came.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..comfyui.adapters import LoadedAdapter
from ..comfyui.loading import load_base_checkpoint, load_clip_vision, require_file
from ..comfyui.models import image_encoder_of
from ..comfyui.sampling import alphas_cumprod
from ..engine.adapter import IMAGE_ENCODER_CLIP_L14, MoAAdapter, init_adapter_from_unet
from ..engine.adapter_file import load_adapter, save_adapter
from ..engine.attention_fn import sdpa_attention
from ..engine.errors import ModelMismatchError, MoAError, MoAInputError
from ..engine.layer import moa_layers
from ..engine.unet_layers import find_attention_layers
from .cache import cache_paths, cached_examples, fill_cache, wait_for_files
from .checkpoints import STATE_FILE, checkpoint_dirs, load_trainer_state, save_checkpoint
from .config import TrainConfig, at_base_resolution
from .dataset import Record, read_dataset
from .encode import Example
from .lr_schedule import learning_rate
from .sampling import write_sample
from .step import AUROC_MAX_T, MoATrainStep, draw, evaluate
from .unet import borrowed_unet, checkpointed_blocks

LOG_FIELDS = ["step", "loss", "denoise", "router", "subject_route", "object", "effect", "subject_x0", "effect_x0",
              "mask_routed", "bg_share", "fg_share", "share_auroc", "lr", "seconds"]

EVAL_FIELDS = ["step", "loss", "share_auroc", "fg_share", "bg_share", "change_in", "change_out"]

Sampler = Callable[[MoAAdapter, int], None]


class NonFiniteLossError(MoAError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before another checkpoint was written."""


# ----------------------------------------------------------------------------- setup

def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def training_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _join_process_group(world: int, device: torch.device) -> bool:
    """Under a launcher (world > 1), the process group (nccl on CUDA, else gloo); True then."""
    if world <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def prepare_output(cfg: TrainConfig, rank: int) -> None:
    """Refuse a non-empty output folder unless --resume (continue) or --force (start over)."""
    out = cfg.output_dir
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.resume:
        if not cfg.force:
            raise MoAInputError(f"{out} is not empty: pass --resume to continue that run or --force to start over "
                                f"(which deletes its checkpoints, samples and log)")
        for child in ("checkpoints", "samples", "loss_log.csv", "eval_log.csv", "adapter.safetensors", "config.json",
                      "summary.json"):
            p = out / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if rank == 0:
        _make_run_folders(out)


def _make_run_folders(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(parents=True, exist_ok=True)


def dataset_records(cfg: TrainConfig) -> list[Record]:
    """The training records of cfg.data; refused (every problem listed) when any row is bad."""
    records, problems = read_dataset(cfg.data, cfg.split, cfg.coco_labels, cfg.max_subjects, augmented=True,
                                     thorough=False)
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:50])
        raise MoAInputError(f"dataset {cfg.data} has {len(problems)} problem(s); fix them first "
                            f"(python -m moa_attention.training.dataset {cfg.data}):\n{listing}")
    return records


# ----------------------------------------------------------------------------- the command line's run

def run(cfg: TrainConfig) -> int:
    """The command line's run: load the checkpoint with ComfyUI (started by the caller, see
    comfyui.bootstrap), fill the encoder cache (each process its shard) and wait for the others'
    shards, then train_adapter() on the cached examples; with --cache-only, stop after filling."""
    rank, world, local_rank = dist_info()
    device = training_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)     # ComfyUI runs the encoders on the current CUDA device: this process's GPU
    if not cfg.cache_only:
        prepare_output(cfg, rank)
    records = dataset_records(cfg)
    for label, path in (("--base", cfg.base), ("--clip-vision", cfg.clip_vision)):
        require_file(path, label)         # both, before minutes of loading
    model, clip, vae, base = load_base_checkpoint(cfg.base, "--base")
    cfg = at_base_resolution(cfg, base.resolution)
    clip_vision = load_clip_vision(cfg.clip_vision, "--clip-vision")
    image_encoder = image_encoder_of(clip_vision, "--clip-vision")
    filled = fill_cache(cfg, records, (model, clip, vae, clip_vision), rank, world, show=rank == 0)
    print(filled.summary(rank, world), flush=True)
    if cfg.cache_only:
        return 0
    # the other processes' shards, before joining the group: a long encoding never meets its timeout
    wait_for_files(cache_paths(cfg, records), "the other processes' shards of the encoder cache", show=rank == 0)
    _join_process_group(world, device)
    examples = cached_examples(cfg, records)
    return train_adapter(cfg, model.model.diffusion_model, alphas_cumprod(model.model), examples, device,
                         sampler=_sampler(cfg, model, vae, examples[0], device), image_encoder=image_encoder)


def _sampler(cfg: TrainConfig, model, vae, example: Example, device: torch.device) -> Sampler:
    """Samples of `example` through ComfyUI's sampler, one ModelPatcher for every sample."""
    loaded: dict[int, LoadedAdapter] = {}

    def sampler(adapter: MoAAdapter, step: int) -> None:
        if id(adapter) not in loaded:
            loaded[id(adapter)] = LoadedAdapter(adapter, "training")
        write_sample(cfg, model, vae, loaded[id(adapter)], example, step, device)
    return sampler


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Training:
    """One training run's moving parts, as the steps below share them."""
    cfg: TrainConfig
    adapter: MoAAdapter
    step_module: nn.Module              # MoATrainStep, inside DistributedDataParallel when world > 1
    optimizer: torch.optim.Optimizer
    names: dict[int, str]               # optimizer index -> adapter parameter name (checkpoints)
    device: torch.device
    rank: int
    world: int
    autocast: Callable
    scaler: torch.amp.GradScaler | None
    step: int = 0                       # optimizer steps done

    @property
    def plain_step(self) -> MoATrainStep:
        return getattr(self.step_module, "module", self.step_module)


def train_adapter(cfg: TrainConfig, diffusion_model: nn.Module, alphas_cumprod: torch.Tensor,
                  examples: Sequence[Example], device: torch.device | str, sampler: Sampler | None = None,
                  eval_examples: Sequence[Example] | None = None,
                  image_encoder: tuple[str, int] = (IMAGE_ENCODER_CLIP_L14, 768)) -> int:
    """Train (or --resume) a MoA adapter on pre-encoded examples: the loop `run` drives, callable
    directly (the toy-world experiment does) with any SD1.5- or SDXL-architecture diffusion model
    and its alphas_cumprod (SDXL examples carry their `y`). Writes everything run() writes into
    cfg.output_dir (rank 0). `sampler(adapter, step)` writes a sample at every multiple of
    cfg.sample_every (when set); it must leave the UNet and the adapter on `device` (ComfyUI's
    sampler moves them). eval_examples (default: examples) are what evaluate() measures into
    summary.json before and after. `image_encoder` (name, width) is what made the examples'
    features: the adapter records it, a resumed one must match it.

    Returns 0, or 130 when interrupted (a checkpoint is kept); raises NonFiniteLossError when the
    loss becomes NaN or infinite. However it ends, `diffusion_model` comes back as it came."""
    device = torch.device(device)
    rank, world, _ = dist_info()
    own_group = _join_process_group(world, device)
    torch.manual_seed(cfg.seed)
    if rank == 0:
        _make_run_folders(cfg.output_dir)
    with borrowed_unet(diffusion_model, device) as unet:
        adapter, resume_from = _start_adapter(cfg, unet, device, rank, image_encoder)
        _check_image_features(adapter, [*_checked(examples), *_checked(eval_examples or [])])
        with moa_layers(unet, adapter, sdpa_attention), checkpointed_blocks(unet, cfg.gradient_checkpointing):
            training = prepare_run(cfg, adapter, unet, alphas_cumprod, device, rank, world, resume_from)
            if rank == 0:
                (cfg.output_dir / "config.json").write_text(json.dumps(adapter.config.training, indent=2))
            eval_set = eval_examples or examples
            eval_before = evaluate(training.plain_step, eval_set, cfg, device) if rank == 0 else {}
            if rank == 0 and cfg.eval_every and training.step == 0:
                _log_eval(cfg, 0, eval_before)
            try:
                _train_steps(training, examples, sampler, eval_set)
            except KeyboardInterrupt:
                _keep_interrupted(training)
                return 130
            if rank == 0:
                _finish(training, eval_set, eval_before)
            if own_group:
                import torch.distributed as dist
                dist.barrier()
                dist.destroy_process_group()
    return 0


def _start_adapter(cfg: TrainConfig, unet: nn.Module, device: torch.device, rank: int,
                   image_encoder: tuple[str, int]) -> tuple[MoAAdapter, Path | None]:
    """A fresh adapter for `unet` made for `image_encoder`, or with --resume the newest
    checkpoint's (and its folder), refused when it was trained with another encoder's width."""
    checkpoints = checkpoint_dirs(cfg.output_dir) if cfg.resume else []
    if cfg.resume and not checkpoints and rank == 0:
        print(f"--resume: no checkpoint in {cfg.output_dir / 'checkpoints'} yet, starting from a fresh adapter")
    if checkpoints:
        adapter = load_adapter(checkpoints[-1] / "adapter.safetensors")
        _check_resumed_unet(adapter, unet, checkpoints[-1])
        _check_resumed_encoder(adapter, image_encoder, checkpoints[-1])
        _check_resumed_prompt(adapter, cfg, checkpoints[-1])
        adapter.requires_grad_(True)
    else:
        name, dim = image_encoder
        adapter = init_adapter_from_unet(unet, expert=cfg.expert, rank=cfg.rank, seed=cfg.seed,
                                         router_margin=cfg.router_margin, image_encoder=name, image_dim=dim,
                                         identity_tokens=cfg.identity_tokens, prompt_schedule=cfg.prompt_schedule)
    adapter.config.training = {k: str(v) for k, v in asdict(cfg).items()}
    adapter.to(device).train()
    return adapter, checkpoints[-1] if checkpoints else None


def _check_resumed_unet(adapter: MoAAdapter, unet: nn.Module, checkpoint: Path) -> None:
    layers = find_attention_layers(unet)
    if adapter.config.layers != layers:
        raise ModelMismatchError(
            f"--base has {len(layers)} attention layers, but the checkpoint being resumed ({checkpoint}) was trained "
            f"on another UNet ({adapter.config.base}, {len(adapter.config.layers)} layers). Pass that run's --base, "
            f"or train into a new --output-dir")


def _check_resumed_encoder(adapter: MoAAdapter, image_encoder: tuple[str, int], checkpoint: Path) -> None:
    name, dim = image_encoder
    if adapter.config.image_dim != dim:
        raise ModelMismatchError(
            f"--clip-vision is {name} ({dim}-d image embeddings), but the checkpoint being resumed ({checkpoint}) "
            f"was trained with {adapter.config.image_encoder} ({adapter.config.image_dim}-d). Pass that run's "
            f"--clip-vision, or train into a new --output-dir")


def _check_resumed_prompt(adapter: MoAAdapter, cfg: TrainConfig, checkpoint: Path) -> None:
    """The multimodal prompt's options must be the checkpoint's: they set the fusion's shape."""
    if adapter.config.identity_tokens != cfg.identity_tokens:
        raise ModelMismatchError(
            f"--identity-tokens is {cfg.identity_tokens}, but the checkpoint being resumed ({checkpoint}) was trained "
            f"with {adapter.config.identity_tokens}. Pass that run's --identity-tokens, or train into a new "
            f"--output-dir")
    if adapter.config.prompt_schedule != cfg.prompt_schedule:
        said = "with" if adapter.config.prompt_schedule else "without"
        raise ModelMismatchError(
            f"the checkpoint being resumed ({checkpoint}) was trained {said} --prompt-schedule. Resume it {said} "
            f"--prompt-schedule, or train into a new --output-dir")


def _checked(examples: Sequence[Example]) -> Sequence[Example]:
    """The examples whose features are checked: all of a list, the first of a cached set (one
    encoder made them all: the cache key holds --clip-vision)."""
    return examples if isinstance(examples, list) else examples[:1]


def _check_image_features(adapter: MoAAdapter, examples: Sequence[Example]) -> None:
    """The encoded subjects' features must be as wide as the adapter's image input."""
    config = adapter.config
    for example in examples:
        for feature in example.features:
            if feature.shape[-1] != config.image_dim:
                raise ModelMismatchError(
                    f"the encoded dataset holds {feature.shape[-1]}-d image features ('{example.caption}'), but the "
                    f"adapter expects {config.image_encoder} ({config.image_dim}-d). Encode the subjects with the "
                    f"image encoder the adapter is made for (--clip-vision)")


def prepare_run(cfg: TrainConfig, adapter: MoAAdapter, unet: nn.Module, alphas_cumprod: torch.Tensor,
                 device: torch.device, rank: int, world: int, resume_from: Path | None) -> _Training:
    """The step module, the optimizer (with its resumed state), mixed precision."""
    step_module: nn.Module = MoATrainStep(adapter, unet, alphas_cumprod, cfg).to(device)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    trainable = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    names = {i: n for i, (n, _) in enumerate(trainable)}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_trainer_state(resume_from / STATE_FILE, optimizer, names) if resume_from else 0
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
    return _Training(cfg, adapter, step_module, optimizer, names, device, rank, world, autocast, scaler, start)


def _train_steps(training: _Training, examples: Sequence[Example], sampler: Sampler | None,
                 eval_set: Sequence[Example] = ()) -> None:
    """Optimizer steps until cfg.steps, each logged, checkpointed and sampled as configured."""
    from tqdm import tqdm
    cfg = training.cfg
    shape = tuple(examples[0].latent.shape)
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=training.step, desc="training", disable=training.rank != 0)
    with _LossLog(cfg, training.rank) as log, bar:
        while training.step < cfg.steps:
            totals = one_step(training, examples, shape)
            training.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", bg=f"{totals['bg_share']:.3f}",
                            fg=f"{totals['fg_share']:.3f}", auroc=f"{totals['share_auroc']:.2f}")
            log.write(training.step, totals, time.time() - t0)
            if not math.isfinite(totals["loss"]):
                raise NonFiniteLossError(f"loss became {totals['loss']} at step {training.step}: lower --lr or use "
                                         f"--mixed-precision no")
            _save_and_sample(training, sampler, eval_set)


def one_step(training: _Training, examples: Sequence[Example], shape: tuple) -> dict[str, float]:
    """One optimizer step over cfg.grad_accum micro-batches; the loss terms averaged (over ranks too)."""
    cfg = training.cfg
    training.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        idx, noise, timesteps = draw(training.step * cfg.grad_accum + micro, training.rank, cfg, len(examples), shape,
                                     training.device, training.world)
        with training.autocast():
            losses = training.step_module([examples[i] for i in idx], noise, timesteps)
        loss = losses["loss"] / cfg.grad_accum
        (training.scaler.scale(loss) if training.scaler else loss).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    if training.world > 1:
        totals = _mean_over_ranks(totals, training.device)
    totals["lr"] = learning_rate(cfg, training.step)
    for group in training.optimizer.param_groups:
        group["lr"] = totals["lr"]
    if training.scaler:
        training.scaler.step(training.optimizer)
        training.scaler.update()
    else:
        training.optimizer.step()
    return totals


def _save_and_sample(training: _Training, sampler: Sampler | None, eval_set: Sequence[Example] = ()) -> None:
    """Rank 0, after a step: the checkpoint, sample and evaluation that fall on it."""
    cfg = training.cfg
    if training.rank != 0:
        return
    if cfg.eval_every and eval_set and training.step % cfg.eval_every == 0:
        _log_eval(cfg, training.step, evaluate(training.plain_step, eval_set, cfg, training.device))
    if cfg.checkpoint_every and training.step % cfg.checkpoint_every == 0:
        save_checkpoint(cfg.output_dir, training.adapter, training.optimizer, training.names, training.step, cfg.keep_checkpoints)
    if sampler and cfg.sample_every and training.step % cfg.sample_every == 0:
        sampler(training.adapter, training.step)


def _keep_interrupted(training: _Training) -> None:
    """Ctrl-C: rank 0 keeps a checkpoint of the steps done, to continue with --resume."""
    if training.rank == 0:
        cfg = training.cfg
        d = save_checkpoint(cfg.output_dir, training.adapter, training.optimizer, training.names, training.step, cfg.keep_checkpoints)
        print(f"\ninterrupted at step {training.step}: checkpoint kept in {d}; continue with --resume")


def _log_eval(cfg: TrainConfig, step: int, totals: dict[str, float]) -> None:
    """A row of eval_log.csv: the fixed-noise evaluation of summary.json (step 0: before
    training), so the share's AUROC and the change inside/outside the subjects can be watched."""
    path = cfg.output_dir / "eval_log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({"step": step, **{k: f"{totals[k]:.6g}" for k in EVAL_FIELDS[1:]}})


class _LossLog:
    """loss_log.csv, written by rank 0: a row every cfg.log_every steps and at the last one;
    appended to when resuming."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.cfg, self.file, self.writer = cfg, None, None
        if rank == 0:
            path = cfg.output_dir / "loss_log.csv"
            new = not path.exists() or not cfg.resume
            self.file = open(path, "w" if new else "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
            if new:
                self.writer.writeheader()

    def __enter__(self) -> "_LossLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()

    def write(self, step: int, totals: dict[str, float], seconds: float) -> None:
        if self.writer and (step % self.cfg.log_every == 0 or step == self.cfg.steps):
            self.writer.writerow({"step": step, **{k: f"{totals[k]:.6g}" for k in LOG_FIELDS if k in totals},
                                  "seconds": f"{seconds:.2f}"})
            self.file.flush()


def _mean_over_ranks(totals: dict[str, float], device: torch.device) -> dict[str, float]:
    """The logged numbers averaged over the processes: with every loss a mean over examples, the
    mean over ranks of equal batches is the global batch's value."""
    import torch.distributed as dist
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _finish(training: _Training, eval_set: Sequence[Example], eval_before: dict[str, float]) -> None:
    """Rank 0 after the last step: final checkpoint, adapter file, summary.json."""
    cfg, step = training.cfg, training.step
    if not cfg.checkpoint_every or step % cfg.checkpoint_every:
        save_checkpoint(cfg.output_dir, training.adapter, training.optimizer, training.names, step, cfg.keep_checkpoints)
    final = save_adapter(training.adapter, cfg.output_dir / "adapter.safetensors", overwrite=True)
    summary = {"steps": step, "world_size": training.world, "global_batch": cfg.batch_size * training.world * cfg.grad_accum,
               "eval_before": eval_before,
               "eval_after": evaluate(training.plain_step, eval_set, cfg, training.device)}
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.eval_every and step % cfg.eval_every:
        _log_eval(cfg, step, summary["eval_after"])
    after = summary["eval_after"]
    print(f"wrote {final} after {step} steps; eval loss {eval_before.get('loss', float('nan')):.4f} -> "
          f"{after['loss']:.4f}; personalized share inside/outside the subjects {after['fg_share']:.3f}/"
          f"{after['bg_share']:.3f}, share AUROC vs mask {after['share_auroc']:.3f} (t <= {AUROC_MAX_T}), "
          f"change of eps inside/outside {after['change_in']:.4f}/{after['change_out']:.4f}")
