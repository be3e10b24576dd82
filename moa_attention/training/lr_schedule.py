"""The learning rate of each optimizer step.

A function of the step alone, so a resumed run continues on the interrupted run's schedule
without any scheduler state in the checkpoint. `cosine` decays from --lr to 0 over --steps: a
constant rate leaves the last weights as noisy as every step's update, which is what a fine,
per-subject detail like a colour cannot afford."""
from __future__ import annotations

import math

from .config import TrainConfig

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate of optimizer step `step` (0-based) of a run of cfg.steps steps."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return cfg.lr
