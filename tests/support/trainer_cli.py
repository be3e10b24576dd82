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


def check_resume_reproduces(env: dict, full_run: Path, out: Path, steps: int, every: int) -> None:
    """Train `every` steps, then --resume to `steps`: the resumed run's log matches `full_run`'s
    (the same options, trained `steps` steps without a stop) step for step."""
    import pytest
    assert run_in_process(train_args(env, out, "--steps", str(every), "--checkpoint-every", str(every))) == 0
    assert run_in_process(train_args(env, out, "--steps", str(steps), "--checkpoint-every", str(every),
                                     "--resume")) == 0
    full, resumed = log_rows(full_run), log_rows(out)
    assert [int(r["step"]) for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(full, resumed):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-7), (a, b)
