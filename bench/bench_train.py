#!/usr/bin/env python
"""Cost of one MoA training step against a plain LoRA fine-tuning step, full-size SD1.5 UNet.

One process builds the SD1.5 UNet (859.5M params, random weights, fp32) with ComfyUI's own
classes and times, at each --size, batch 1, with gradient checkpointing off and on
(training/unet.py's checkpointed_blocks):

    lora r<rank>       a plain fine-tuning step: a LoRA of the same rank on the projections
                       MoA's expert covers (lora_baseline.py), the plain denoising loss, AdamW
    moa lowrank r<rank> the trainer's own step (training/loop.py's prepare_run and one_step:
    moa full           MoATrainStep with the default losses, AdamW), a fresh adapter; the
                       default background-effect loss runs the frozen base model once more
                       (forward, no gradient): "lowrank-no-effect" is the lowrank step without it

A step is forward + backward + the optimizer step. Configurations are interleaved (the order
reversed every other round) after one untimed warm-up step each (it also creates AdamW's
state); the median over --repeats rounds is reported, and each MoA step's ratio to the LoRA
step of the same round and checkpointing. Memory, per configuration: the peak RSS growth
during a timed step (memory.py's PeakRSS: VmHWM reset before the step, after malloc_trim), and
the peak a run holds = UNet weights + trainable weights with AdamW's state + that growth.
memory.py's tensor high-water mode is not used: the tensors autograd saves for backward are
held outside Python, where it cannot see them, so it would miss the activations.

    .venv/bin/python bench/bench_train.py --quick                 # tiny UNet, seconds
    .venv/bin/python bench/bench_train.py --sizes 256 512 --repeats 2 --threads 1

Results: bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from memory import PeakRSS, human
from unet import COMFY_DIR, ComfyUIMissing, import_comfy, import_pack, unet_config

#: what --experts can time; "lowrank-no-effect" is the lowrank step with --background-effect-weight 0
#: (no forward of the frozen base model for the background-effect loss)
EXPERTS = ("lora", "lowrank", "full", "lowrank-no-effect")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet (model_channels 32, 2 levels): a smoke run")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes in px (default 256 512; 64 with --quick)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median is reported")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--experts", nargs="+", choices=EXPERTS, default=["lora", "lowrank", "full"],
                    help="what to time: lora (the baseline, always kept), lowrank, full, lowrank-no-effect")
    ap.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    args.sizes = args.sizes or ([64] if args.quick else [256, 512])
    if any(s % 64 for s in args.sizes):
        ap.error("--sizes must be multiples of 64 (the UNet downsamples the latent 3 times)")
    if "lora" not in args.experts:
        args.experts = ["lora", *args.experts]
    return args


def state_bytes(params, optimizer) -> int:
    """Trainable weights plus the optimizer's state for them (AdamW: two moments each)."""
    import torch
    total = sum(p.numel() * p.element_size() for p in params)
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


@dataclass
class Trainer:
    """One kind of step (LoRA or MoA with an expert) with its own weights and optimizer; the
    checkpointing setting is per call, so both settings share them."""
    name: str
    run: object                     # callable(checkpointing: bool) -> None, one optimizer step
    params: list
    optimizer: object
    steps: int = 0


def lora_trainer(dm, paths: list[str], schedule, example, rank: int) -> Trainer:
    import torch
    import torch.nn.functional as F
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.step import draw
    from comfyui_moa.moa_attention.training.unet import checkpointed_blocks
    from lora_baseline import LoRA
    lora = LoRA(dm, paths, rank).train()
    params = list(lora.parameters())
    cfg = TrainConfig(Path(), Path(), Path(), Path(), rank=rank)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x0, text = example.latent[None].float(), example.text[None]

    def run(checkpointing: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        _, noise, t = draw(trainer.steps, 0, cfg, 1, tuple(example.latent.shape), "cpu")
        ac = schedule[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        with lora.installed(), checkpointed_blocks(dm, checkpointing):     # backward recomputes blocks
            pred = dm(noisy, t.float(), context=text, transformer_options={}).float()
            F.mse_loss(pred, noise).backward()
        optimizer.step()
        trainer.steps += 1
    trainer = Trainer(f"lora r{rank}", run, params, optimizer)
    return trainer


def moa_trainer(dm, schedule, example, expert: str, rank: int, size: int) -> Trainer:
    """The trainer's own step: loop.prepare_run's MoATrainStep and AdamW, loop.one_step."""
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.attention_fn import sdpa_attention
    from comfyui_moa.moa_attention.engine.layer import moa_layers
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.loop import one_step, prepare_run
    from comfyui_moa.moa_attention.training.unet import checkpointed_blocks
    import torch
    no_effect = expert.endswith("-no-effect")
    expert = expert.removesuffix("-no-effect")
    cfg = TrainConfig(Path(), Path(), Path(), Path(), expert=expert, rank=rank, resolution=size)
    if no_effect:
        cfg.background_effect_weight = 0.0
    adapter = init_adapter_from_unet(dm, expert=expert, rank=rank, seed=cfg.seed,
                                     router_margin=cfg.router_margin).train()
    training = prepare_run(cfg, adapter, dm, schedule, torch.device("cpu"), 0, 1, None)
    shape = tuple(example.latent.shape)

    def run(checkpointing: bool) -> None:
        with moa_layers(dm, adapter, sdpa_attention), checkpointed_blocks(dm, checkpointing):
            one_step(training, [example], shape)
        training.step += 1
    params = [p for p in adapter.parameters() if p.requires_grad]
    name = f"moa {expert}" + (f" r{rank}" if expert == "lowrank" else "") + (", effect 0" if no_effect else "")
    return Trainer(name, run, params, training.optimizer)


def make_example(size: int):
    """One training example: a random latent, prompt and subject feature, the subject a centred
    box over a quarter of the image (what the MoA losses see; LoRA uses latent and prompt)."""
    import torch
    from comfyui_moa.moa_attention.training.encode import Example
    g, latent = torch.Generator().manual_seed(size), size // 8
    masks = torch.zeros(1, latent, latent)
    masks[:, latent // 4: 3 * latent // 4, latent // 4: 3 * latent // 4] = 1.0
    return Example(torch.randn(4, latent, latent, generator=g), torch.randn(77, 768, generator=g), [[2]],
                   [torch.randn(768, generator=g)], masks, "a photo of a man")


@dataclass
class Measured:
    seconds: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    rss_growth: list = field(default_factory=list)
    load: list = field(default_factory=list)
    state: int = 0


def timed_step(trainer: Trainer, checkpointing: bool, rss: PeakRSS, m: Measured) -> None:
    out: dict = {}
    with rss.measure(out):
        t, c = time.perf_counter(), time.process_time()
        trainer.run(checkpointing)
        m.seconds.append(time.perf_counter() - t)
        m.cpu.append(time.process_time() - c)
    m.rss_growth.append(out["rss_peak"] - out["rss_before"])
    m.load.append(os.getloadavg()[0])


def config_name(trainer: Trainer, checkpointing: bool) -> str:
    return f"{trainer.name}, ckpt {'on' if checkpointing else 'off'}"


def measure_size(dm, paths, schedule, args: argparse.Namespace, size: int) -> dict[tuple[str, bool], Measured]:
    """The warm-up round and the interleaved timed rounds of every configuration."""
    example = make_example(size)
    trainers = [lora_trainer(dm, paths, schedule, example, args.rank)]
    trainers += [moa_trainer(dm, schedule, example, ex, args.rank, size) for ex in args.experts if ex != "lora"]
    configs = [(tr, ck == "on") for ck in args.checkpointing for tr in trainers]
    results = {(tr.name, ck): Measured() for tr, ck in configs}
    rss = PeakRSS()
    for rnd in range(args.repeats + 1):                 # round 0: the warm-up
        for tr, ck in (configs if rnd % 2 == 0 else configs[::-1]):
            m = results[(tr.name, ck)] if rnd else Measured()
            timed_step(tr, ck, rss, m)
            print(f"  {size} px {'warm-up' if not rnd else f'rep {rnd}':7s} {config_name(tr, ck):28s} "
                  f"{m.seconds[-1]:7.2f} s  cpu {m.cpu[-1]:7.2f} s  +RSS {human(m.rss_growth[-1]):>10s}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    for tr, ck in configs:
        results[(tr.name, ck)].state = state_bytes(tr.params, tr.optimizer)
    return results


def paired_ratios(results: dict, name: str, base: str, checkpointing: bool, key: str = "seconds") -> list[float]:
    """This configuration's step over the baseline's step of the same round and checkpointing
    (wall seconds, or with key="cpu" the process's CPU seconds)."""
    return [a / b for a, b in zip(getattr(results[(name, checkpointing)], key),
                                  getattr(results[(base, checkpointing)], key))]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median [min-max] of a list, formatted."""
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def print_tables(size: int, results: dict, weights_bytes: int, checkpointing: list[bool]) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    base = names[0]
    print(f"\n{size} px (latent {size // 8}), batch 1: wall and process CPU seconds per step, median [min-max] over "
          f"the rounds; ratio = step / {base}'s step of the same round and checkpointing (wall, and CPU: on a "
          f"loaded machine the CPU seconds are the steadier)")
    print(f"{'':26s}" + "".join(f" | ckpt {'on' if ck else 'off':3s} {'s/step':>20s} {'ratio':>20s} {'cpu s':>20s} "
                                f"{'cpu ratio':>20s}" for ck in checkpointing))
    for name in names:
        row = f"{name:26s}"
        for ck in checkpointing:
            m = results[(name, ck)]
            ratios = [spread(paired_ratios(results, name, base, ck, key), "{:.3f}") if name != base else "1"
                      for key in ("seconds", "cpu")]
            row += (f" | {'':8s} {spread(m.seconds):>20s} {ratios[0]:>20s} {spread(m.cpu):>20s} "
                    f"{ratios[1]:>20s}")
        print(row)
    print(f"\nmemory at {size} px: step = largest peak RSS growth during a timed step (activations, gradients, "
          f"temporaries; glibc makes it vary by tens of MiB); peak a run holds = UNet weights "
          f"({human(weights_bytes)}) + state (trainable weights and AdamW's moments) + step")
    for name in names:
        row = f"{name:26s}"
        for ck in checkpointing:
            m = results[(name, ck)]
            step = max(m.rss_growth)
            row += (f" | ckpt {'on' if ck else 'off':3s} state {human(m.state):>10s} step {human(step):>10s} "
                    f"peak {human(weights_bytes + m.state + step):>10s}")
        print(row)


def build_unet(quick: bool):
    import torch
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    from support.model_factory import build_sd15_model_patcher
    base = build_sd15_model_patcher(unet_config(quick), seed=0, dtype=torch.float32)
    dm = base.get_model_object("diffusion_model")
    dm.requires_grad_(False).eval()                  # frozen, as training/unet.py's borrowed_unet does
    return dm, [s.path for s in find_attention_layers(dm)], alphas_cumprod(base.model)


def main() -> int:
    args = parse_args()
    t_start = time.perf_counter()
    print(f"importing ComfyUI from {COMFY_DIR} ...", flush=True)
    try:
        import_comfy()
    except ComfyUIMissing as e:
        print(e, file=sys.stderr)
        return 1
    import_pack()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm, paths, schedule = build_unet(args.quick)
    weights = sum(p.numel() * p.element_size() for p in dm.parameters())
    print(f"{'tiny' if args.quick else 'full-size SD1.5'} UNet: {sum(p.numel() for p in dm.parameters()) / 1e6:.1f}M "
          f"params, fp32, {len(paths)} attention layers; {torch.get_num_threads()} thread(s); "
          f"{args.repeats} rounds; load avg {os.getloadavg()[0]:.2f}", flush=True)
    checkpointing = [ck == "on" for ck in args.checkpointing]
    for size in args.sizes:
        results = measure_size(dm, paths, schedule, args, size)
        print_tables(size, results, weights, checkpointing)
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
