"""The trainer's command line, run in-process on the tests' tiny models (SD1.5 and SDXL alike)."""
from __future__ import annotations

import csv
from pathlib import Path

from .runtime import COMFY_DIR


def train_args(env: dict, out: Path, *extra: str) -> list[str]:
    """A short, small run: env holds the --base checkpoint ("ckpt"), "clip_vision" and "data"."""
    return ["--base", str(env["ckpt"]), "--clip-vision", str(env["clip_vision"]), "--data", str(env["data"]),
            "--output-dir", str(out), "--resolution", "64", "--rank", "4", "--lr", "2e-3", "--seed", "3",
            "--comfyui", str(COMFY_DIR), *extra]


def run_in_process(args: list[str]) -> int:
    from comfyui_moa.moa_attention.training.cli import parse_args
    from comfyui_moa.moa_attention.training.loop import run
    return run(parse_args(args))


def log_rows(out: Path) -> list[dict]:
    with open(out / "loss_log.csv") as f:
        return list(csv.DictReader(f))
