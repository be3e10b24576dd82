"""`--estimate`: real steps with the run's settings on the tiny SD1.5, then the figures."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_trainer import train_args, train_env  # noqa: F401 (train_env: the trainer tests' fixture)


def _figures(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("estimate: "))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([^\s]+)", line)}


def test_estimate_on_cpu_prints_positive_figures_and_trains_nothing(train_env, capsys):  # noqa: F811
    from comfyui_moa.moa_attention.training.cli import main
    out = Path(train_env["data"]).parent / "estimate_run"
    assert main(train_args(train_env, out, "--estimate", "2", "--steps", "500", "--batch-size", "2")) == 0
    stdout = capsys.readouterr().out
    f = _figures(stdout)
    assert f["seconds_per_step"] > 0 and f["peak_bytes"] > 0 and f["steps"] == 500, stdout
    assert f["projected_seconds"] == pytest.approx(500 * f["seconds_per_step"], rel=1e-4), stdout
    assert f["fits"] == 1, stdout
    assert "seconds per step: " in stdout and "projected time for 500 steps: " in stdout, stdout
    assert "peak resident memory (CPU): " in stdout and "encoding the dataset once: " in stdout, stdout
    assert not out.exists()


def test_a_run_that_does_not_fit_is_told_what_to_change():
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.estimate import Figures, report
    cfg = TrainConfig(Path(), Path(), Path(), Path(), batch_size=4, rank=64, steps=1000)
    full = Figures(0.5, peak_bytes=79 * 2**30, device_bytes=80 * 2**30)
    text = report(cfg, full, 0.2, 100, torch.device("cuda"))
    assert "does not fit; to lower the memory try: --mixed-precision bf16" in text, text
    for tip in ("--gradient-checkpointing", "--batch-size 2 --grad-accum 2", "--rank 32"):
        assert tip in text, text
    assert "projected time for 1000 steps: 0h08m20s" in text, text
    oom = report(cfg, Figures(float("nan"), 10, 80, out_of_memory=True), 0.2, 100, torch.device("cuda"))
    assert "out of memory during a step" in oom and "does not fit" in oom, oom
    ok = report(cfg, Figures(0.5, 40 * 2**30, 80 * 2**30), 0.2, 100, torch.device("cuda"))
    assert "\nfits\n" in ok and "fits=1" in ok, ok
