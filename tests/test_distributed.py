"""Data-parallel training on existing launchers, on CPU (gloo): a run started by accelerate with
2 processes and resumed by torchrun as 2 nodes x 1 process, joined through a c10d rendezvous on
the loopback address. N processes with batch b train on exactly the examples, noise and
timesteps of 1 process with batch N*b (the global batch is drawn from (seed, step) and each
rank takes its slice), so the adapters agree up to the order of floating-point sums."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.datasets import write_dataset
from support.waits import minutes

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
#: fp32 adapters (the step-4 checkpoints) of 1 process vs 2 get the same gradients summed in another
#: order (equal to ~1e-7); AdamW divides by sqrt(v), so where a gradient is ~0 that rounding shows
#: up in the update (the test prints the difference beside what the last two steps moved).
#: The bound: 2% of what two steps of training move, and never more than 2e-4.
RELATIVE_TO_UPDATE = 0.02
ADAPTER_ATOL = 2e-4
LOSS_RTOL = 1e-4

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(models_base, tmp_path_factory):
    base, info = models_base
    data = write_dataset(tmp_path_factory.mktemp("dp_data"), n=4)
    cache = tmp_path_factory.mktemp("dp_cache")
    return {"ckpt": info["checkpoint_path"], "clip_vision": info["clip_vision_path"], "data": data,
            "environ": dict(os.environ, PYTHONUNBUFFERED="1", MOA_CACHE_DIR=str(cache))}


def args(env, out: Path, batch: int, *extra: str) -> list[str]:
    return ["--base", str(env["ckpt"]), "--clip-vision", str(env["clip_vision"]), "--data", str(env["data"]),
            "--output-dir", str(out), "--resolution", "64", "--rank", "4", "--lr", "2e-3", "--seed", "5",
            "--batch-size", str(batch), "--checkpoint-every", "2", "--comfyui", str(ROOT / ".dev" / "ComfyUI"),
            *extra]


def launch(cmds: list[list[str]], env, log: Path) -> None:
    """Start every command (the nodes of one job) and wait for all; each must exit 0."""
    procs = []
    for i, cmd in enumerate(cmds):
        f = open(log.with_suffix(f".{i}.log"), "wb")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env["environ"]), f))
    try:
        for i, (p, f) in enumerate(procs):
            rc = p.wait(timeout=minutes(20))
            f.close()
            assert rc == 0, log.with_suffix(f".{i}.log").read_text(errors="replace")[-4000:]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()


def accelerate(n: int) -> list[str]:
    # --multi_gpu selects accelerate's torch.distributed launcher; on a machine without GPUs the
    # trainer runs each process on the CPU with gloo (--cpu would start one process only)
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "moa_attention.train"]


def torchrun_node(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "moa-test",
            "-m", "moa_attention.train"]


def losses(out: Path) -> list[float]:
    with open(out / "loss_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def checkpoint(run: Path, step: int = STEPS) -> Path:
    """A checkpoint's adapter, kept in fp32 (adapter.safetensors itself is fp16)."""
    return run / "checkpoints" / f"step_{step:06d}" / "adapter.safetensors"


def max_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


@pytest.fixture(scope="module")
def single(env, tmp_path_factory, comfy):
    """The reference: one process (this one: the command line's run in-process), batch 2."""
    from support.trainer_cli import run_in_process
    out = tmp_path_factory.mktemp("dp") / "single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_CACHE_DIR", env["environ"]["MOA_CACHE_DIR"])
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(name, raising=False)
        assert run_in_process(args(env, out, 2, "--steps", str(STEPS))) == 0
    return out


def test_accelerate_then_torchrun_resume_match_one_process_with_the_same_global_batch(env, single, tmp_path):
    """Two steps under accelerate (2 processes), then --resume to STEPS as two torchrun nodes
    meeting at 127.0.0.1: the same adapter and losses as one uninterrupted process, whichever
    launcher started or resumed the run."""
    out = tmp_path / "two_processes"
    launch([[*accelerate(2), *args(env, out, 1, "--steps", "2")]], env, tmp_path / "first")
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000002"]
    node = [*torchrun_node(free_port()), *args(env, out, 1, "--steps", str(STEPS), "--resume")]
    launch([node, node], env, tmp_path / "nodes")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert len(list(out.glob("*.safetensors"))) == 1        # rank 0 alone writes
    rows = losses(out)
    assert len(rows) == STEPS
    diff, update = max_diff(checkpoint(out), checkpoint(single)), max_diff(checkpoint(single), checkpoint(single, 2))
    print(f"accelerate 2 processes for 2 steps, torchrun 2 nodes x 1 resumed to {STEPS}, vs 1 process with batch "
          f"2: max |adapter difference| = {diff:.2e} (steps 3-4 moved weights by up to {update:.2e}); losses "
          f"{rows} vs {losses(single)}")
    assert diff <= min(ADAPTER_ATOL, RELATIVE_TO_UPDATE * update)
    assert rows == pytest.approx(losses(single), rel=LOSS_RTOL)
