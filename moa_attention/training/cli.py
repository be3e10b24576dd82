"""Train a MoA adapter: `python -m moa_attention.train --base CKPT --clip-vision FILE --data DIR --output-dir DIR`.

Runs unchanged on one device or data-parallel under `torchrun --nproc_per_node N` or
`accelerate launch --num_processes N` (both set RANK/WORLD_SIZE; CPU uses gloo, CUDA nccl).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..comfyui.bootstrap import start_comfyui
from ..engine.errors import MoAError
from .config import TIMESTEP_BIASES, TrainConfig
from .dataset import add_data_options
from .lr_schedule import LR_SCHEDULES


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(Path(), Path(), Path(), Path())
    p = argparse.ArgumentParser(prog="python -m moa_attention.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="SD1.5 or SDXL base checkpoint (.safetensors)")
    p.add_argument("--clip-vision", type=Path, required=True, help="CLIP vision model, e.g. ViT-L/14 (.safetensors)")
    p.add_argument("--data", type=Path, required=True,
                   help="dataset folder: manifest.jsonl, or FastComposer's layout (image_ids*.txt, <id[:5]>/<id>.jpg/json/npy)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="run folder: adapter.safetensors, checkpoints/, samples/, loss_log.csv (required but "
                        "with --cache-only)")
    p.add_argument("--expert", choices=["lowrank", "full"], default=d.expert, help="personalized expert storage")
    p.add_argument("--rank", type=int, default=d.rank, help="rank of a lowrank expert")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="training image size (multiple of 64); default: the base's, 512 for SD1.5, 1024 for SDXL")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="constant, or cosine: decays from --lr to 0 over --steps (a resumed run follows it)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes data order, noise and init")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d.mixed_precision)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute transformer blocks in "
                                                                          "backward (less memory, more compute)")
    _add_loss_options(p, d)
    add_data_options(p, d.split, d.coco_labels, d.max_subjects)
    _add_run_options(p, d)
    return p


def _add_loss_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The losses' weights; research knobs go in their own 'experimental' section of --help."""
    x = p.add_argument_group("experimental", "research knobs: the defaults are the tested recipe (the x0 terms "
                                             "and the cubic schedule off); why each: docs/training.md")
    p.add_argument("--router-loss-weight", type=float, default=d.router_loss_weight,
                   help="the paper's router loss: personalized share on background pixels, averaged over layers")
    x.add_argument("--router-loss-power", type=float, default=d.router_loss_power,
                   help="share**power in the router loss (2 = the paper's squared form)")
    p.add_argument("--subject-route-weight", type=float, default=d.subject_route_weight,
                   help="-log(share) on subject pixels: rewards routing the subject to the expert")
    p.add_argument("--object-loss-weight", type=float, default=d.object_loss_weight,
                   help="FastComposer's balanced-L1 object loss on the subject tokens' cross-attention")
    p.add_argument("--subject-loss-weight", type=float, default=d.subject_loss_weight,
                   help="denoising-loss weight of subject pixels (background pixels weigh 1)")
    p.add_argument("--background-effect-weight", type=float, default=d.background_effect_weight,
                   help="squared change of eps against the base model outside the subjects (one extra "
                        "UNet forward per step)")
    x.add_argument("--identity-tokens", type=int, default=d.identity_tokens,
                   help="fused identity tokens per subject: 1 replaces the class word (the paper's design); more "
                        "add tokens after the prompt that each subject pixel can choose between")
    x.add_argument("--prompt-schedule", action="store_true",
                   help="condition the fused prompt on the timestep and the UNet layer, as the paper does: each "
                        "layer and noise level reads its own channels of the identity (adapter format 4)")
    x.add_argument("--router-margin", type=float, default=d.router_margin,
                   help="a fresh router's logit margin towards the prior (4: share 0.018)")
    x.add_argument("--subject-x0-weight", type=float, default=d.subject_x0_weight,
                   help="weight of the subject's error in x0 units: eps error x (1 - abar) / abar, capped. "
                        "Identity is decided at high noise, where the eps loss barely sees it")
    x.add_argument("--effect-x0-weight", type=float, default=d.effect_x0_weight,
                   help="weight of the change against the base model outside the subjects in x0 units (the "
                        "picture the sampler heads for), capped like --subject-x0-weight")
    x.add_argument("--mask-routed-weight", type=float, default=d.mask_routed_weight,
                   help="weight of the subject's denoising error (x0 units at high noise) in a second forward "
                        "where the subject mask routes instead of the router: the expert learns the subject "
                        "at full share from the first step (one extra UNet forward and backward per step)")
    x.add_argument("--x0-weight-cap", type=float, default=d.x0_weight_cap,
                   help="cap of the (1 - abar) / abar factor of the x0-unit terms (20: reached at t=771)")
    x.add_argument("--timestep-bias", choices=TIMESTEP_BIASES, default=d.timestep_bias,
                   help="timestep sampling: uniform, or cubic (t = 1000 (1 - u^3), as T2I-Adapter trains: "
                        "more steps at high noise, where layout and identity are decided)")
    x.add_argument("--recolour-t", type=int, default=d.recolour_t,
                   help="noisy inputs at t >= this show each subject in another example's colours while the "
                        "target stays the true picture, so the expert takes the colours from the reference, "
                        "not from what the noisy input shows (needs batch >= 2; 1000: off)")


def _add_run_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Bookkeeping of a run: evaluation, checkpoints, samples, log, resuming, device, ComfyUI."""
    p.add_argument("--eval-examples", type=int, default=d.eval_examples,
                   help="examples measured before and after training (summary.json)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="write a sample image every N steps")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="every N steps, the before/after evaluation of summary.json (share AUROC, change inside/"
                        "outside the subjects) on the same examples, into eval_log.csv (0: only at the ends)")
    p.add_argument("--estimate", type=int, nargs="?", const=3, default=d.estimate, metavar="STEPS",
                   help="time STEPS (3) real training steps with these options and print seconds per step, peak "
                        "memory, the time for --steps and what to change if it does not fit; trains nothing")
    p.add_argument("--cache-only", action="store_true",
                   help="encode the dataset into the encoder cache ($MOA_CACHE_DIR) and exit; under torchrun or "
                        "accelerate each process fills its share")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes decoding images, masks and references (0: in this process)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --output-dir")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--comfyui", type=Path, default=None,
                   help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is installed in, "
                        "or the dev checkout's .dev/ComfyUI)")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.estimate < 0 or ns.max_subjects < 1 or ns.workers < 0 or ns.identity_tokens < 1:
        parser.error("--estimate takes a number of steps >= 0, --max-subjects and --identity-tokens a number >= 1, "
                     "--workers >= 0")
    if ns.output_dir is None and not ns.cache_only:
        parser.error("--output-dir is required (but with --cache-only)")
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items()})
    cfg.coco_labels = tuple(cfg.coco_labels)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """0: trained; 130: interrupted (a checkpoint is kept); 1: refused or stopped, with the reason
    on stderr (a bad option or file, a dataset problem, a NaN loss, no ComfyUI)."""
    cfg = parse_args(argv)
    _deliver_ctrl_c()
    try:
        start_comfyui(cfg.comfyui, cpu=True if cfg.device == "cpu" else None)
        if cfg.estimate:
            from .estimate import run_estimate
            return run_estimate(cfg)
        from .loop import run
        return run(cfg)
    except MoAError as e:
        print(e, file=sys.stderr)
        return 1


def _deliver_ctrl_c() -> None:
    """Ctrl-C / SIGINT must reach the loop, which saves a checkpoint and exits 130. A process
    started as a background job by a non-interactive shell (`cmd &` in a script, CI runners)
    inherits SIGINT *ignored*, and Python then installs no handler: the run would never stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
