"""`--estimate`: a few real training steps with the run's own settings, then what the full run
costs: seconds per step, peak memory, the time for --steps, and what to change when it does not
fit. Nothing is written to --output-dir; on the CPU the peak is the process's resident memory,
against the machine's.

The steps are the trainer's (loop.prepare_run, loop.one_step) on a handful of the dataset's
images, encoded once without the encoder cache, so the figures are the run's."""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from ..comfyui.loading import load_base_checkpoint, load_clip_vision, require_file
from ..comfyui.sampling import alphas_cumprod
from ..engine.adapter import init_adapter_from_unet
from ..engine.attention_fn import sdpa_attention
from ..engine.layer import moa_layers
from .config import TrainConfig, at_base_resolution
from .encode import Example, encode_record
from .loop import dataset_records, dist_info, one_step, prepare_run, training_device
from .unet import borrowed_unet, checkpointed_blocks

WARMUP_STEPS = 1          # allocator, kernels and autotuning settle; not timed
FITS_FRACTION = 0.9       # a peak above this share of the device's memory does not fit


@dataclass
class Figures:
    seconds_per_step: float
    peak_bytes: int                 # device memory (CUDA) or the process's resident memory (CPU)
    device_bytes: int | None        # the device's total memory (CUDA) or the machine's (CPU); None: unknown
    out_of_memory: bool = False

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and (self.device_bytes is None or
                                           self.peak_bytes <= FITS_FRACTION * self.device_bytes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> tuple[int, int | None]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, ram      # ru_maxrss: KiB on Linux


def measure_steps(cfg: TrainConfig, diffusion_model, schedule: torch.Tensor, examples: list[Example],
                  device: torch.device, steps: int) -> Figures:
    """Time `steps` optimizer steps (after a warm-up step) of a fresh adapter on `examples`."""
    with borrowed_unet(diffusion_model, device) as unet:
        adapter = init_adapter_from_unet(unet, expert=cfg.expert, rank=cfg.rank, seed=cfg.seed,
                                         router_margin=cfg.router_margin,
                                         identity_tokens=cfg.identity_tokens,
                                         prompt_schedule=cfg.prompt_schedule).to(device).train()
        with moa_layers(unet, adapter, sdpa_attention), checkpointed_blocks(unet, cfg.gradient_checkpointing):
            training = prepare_run(cfg, adapter, unet, schedule, device, 0, 1, None)
            shape = tuple(examples[0].latent.shape)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                for _ in range(WARMUP_STEPS):
                    one_step(training, examples, shape)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    one_step(training, examples, shape)
                _sync(device)
            except torch.cuda.OutOfMemoryError:
                return Figures(float("nan"), *_peak(device), out_of_memory=True)
            return Figures((time.perf_counter() - t0) / steps, *_peak(device))


def advice(cfg: TrainConfig, device: torch.device) -> list[str]:
    """What lowers the memory of a run that does not fit, cheapest first."""
    tips = []
    if cfg.mixed_precision == "no" and device.type == "cuda":
        tips.append("--mixed-precision bf16 (fp16 on GPUs without bf16)")
    if not cfg.gradient_checkpointing:
        tips.append("--gradient-checkpointing (less memory, about 30 % slower)")
    if cfg.batch_size > 1:
        tips.append(f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2} (the same effective batch)")
    if cfg.expert == "full":
        tips.append("--expert lowrank")
    elif cfg.rank > 16:
        tips.append(f"--rank {cfg.rank // 2}")
    return tips


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def report(cfg: TrainConfig, figures: Figures, encode_seconds: float, images: int, device: torch.device) -> str:
    """The figures for a person, and one line for a script (`estimate: key=value ...`)."""
    kind = "device memory" if device.type == "cuda" else "resident memory (CPU)"
    total = f" of {figures.device_bytes / 2**30:.1f} GiB" if figures.device_bytes else ""
    lines = [f"device: {device}; batch {cfg.batch_size} x accumulation {cfg.grad_accum}, resolution {cfg.resolution}, "
             f"{cfg.expert} expert (rank {cfg.rank}), mixed precision {cfg.mixed_precision}, "
             f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"]
    if figures.out_of_memory:
        lines.append(f"out of memory during a step (peak {figures.peak_bytes / 2**30:.2f} GiB{total})")
    else:
        projected = figures.seconds_per_step * cfg.steps
        lines += [f"seconds per step: {figures.seconds_per_step:.4g}",
                  f"peak {kind}: {figures.peak_bytes / 2**30:.2f} GiB{total}",
                  f"projected time for {cfg.steps} steps: {_duration(projected)} (one process; N data-parallel "
                  f"processes take about as long per step with N times the batch)",
                  f"encoding the dataset once: {encode_seconds:.3g} s per image, about "
                  f"{_duration(encode_seconds * images)} for its {images} image(s) (then cached)"]
    lines.append("fits" if figures.fits else "does not fit; to lower the memory try: " + "; ".join(advice(cfg, device)))
    lines.append(f"estimate: seconds_per_step={figures.seconds_per_step:.6g} peak_bytes={figures.peak_bytes} "
                 f"steps={cfg.steps} projected_seconds={figures.seconds_per_step * cfg.steps:.6g} "
                 f"fits={int(figures.fits)}")
    return "\n".join(lines)


def run_estimate(cfg: TrainConfig) -> int:
    """The command line's --estimate (ComfyUI started by the caller). Returns 0, also when the run
    does not fit: the report says what to change."""
    device = training_device(cfg, dist_info()[2])
    records = dataset_records(cfg)
    for label, path in (("--base", cfg.base), ("--clip-vision", cfg.clip_vision)):
        require_file(path, label)
    model, clip, vae, base = load_base_checkpoint(cfg.base, "--base")
    cfg = at_base_resolution(cfg, base.resolution)
    clip_vision = load_clip_vision(cfg.clip_vision, "--clip-vision")
    sample = records[:max(3, cfg.batch_size)]
    examples = [encode_record(cfg, sample[0], model, clip, vae, clip_vision)]     # loads the encoders: not timed
    t0 = time.perf_counter()
    examples += [encode_record(cfg, rec, model, clip, vae, clip_vision) for rec in sample[1:]]
    encode_seconds = (time.perf_counter() - t0) / max(1, len(sample) - 1)
    figures = measure_steps(cfg, model.model.diffusion_model, alphas_cumprod(model.model), examples, device,
                            cfg.estimate)
    print(report(cfg, figures, encode_seconds, len(records), device))
    sys.stdout.flush()
    return 0
