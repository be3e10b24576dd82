"""The trainer on the tiny SD1.5 checkpoint and a tiny synthetic dataset."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.datasets import write_dataset
from support.waits import minutes, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_env(models_base, tmp_path_factory):
    base, info = models_base
    data = write_dataset(tmp_path_factory.mktemp("data"), n=2)
    # the encoded-dataset cache: per test session, shared by the runs below (subprocesses inherit it)
    os.environ["MOA_CACHE_DIR"] = str(tmp_path_factory.mktemp("encoded_cache"))
    return {"base": base, "ckpt": info["checkpoint_path"], "clip_vision": info["clip_vision_path"], "data": data}


def train_args(env, out: Path, *extra: str) -> list[str]:
    return ["--base", str(env["ckpt"]), "--clip-vision", str(env["clip_vision"]), "--data", str(env["data"]),
            "--output-dir", str(out), "--resolution", "64", "--rank", "4", "--lr", "2e-3", "--seed", "3",
            "--comfyui", str(ROOT / ".dev" / "ComfyUI"), *extra]


def run_in_process(args: list[str]) -> int:
    from moa_attention.training.cli import parse_args
    from moa_attention.training.loop import run
    return run(parse_args(args))


def log_rows(out: Path) -> list[dict]:
    with open(out / "loss_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(train_env, tmp_path_factory, comfy):
    out = tmp_path_factory.mktemp("run") / "moa_run"
    assert run_in_process(train_args(train_env, out, "--steps", "12", "--checkpoint-every", "6",
                                     "--sample-every", "12", "--sample-steps", "2")) == 0
    return out


def test_training_lowers_the_loss_and_the_background_share(trained):
    summary = json.loads((trained / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"], summary
    assert after["bg_share"] < 0.9 * before["bg_share"], summary
    rows = log_rows(trained)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert (trained / "samples" / "step_000012.png").is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_000006", "step_000012"]


def test_trained_adapter_loads_in_the_node_and_samples_through_the_server(trained, server, server_inputs):
    from support.graphs import moa_graph
    target = server.base / "models" / "moa" / "trained_tiny.safetensors"
    shutil.copy(trained / "adapter.safetensors", target)
    info = server.request("/object_info/MoAAdapterLoader")
    assert "trained_tiny.safetensors" in info["MoAAdapterLoader"]["input"]["required"]["adapter_name"][0]
    g = moa_graph("trained_tiny.safetensors", [{"image": "cat.png", "mask": "cat_mask.png", "word": "dog"}],
                  "a photo of a dog on the grass")
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_resume_continues_the_same_run(train_env, trained, tmp_path):
    out = tmp_path / "resumed"
    assert run_in_process(train_args(train_env, out, "--steps", "6", "--checkpoint-every", "6")) == 0
    assert run_in_process(train_args(train_env, out, "--steps", "12", "--checkpoint-every", "6", "--resume")) == 0
    full, resumed = log_rows(trained), log_rows(out)
    assert [int(r["step"]) for r in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-7), (a, b)


def test_output_is_not_overwritten_without_force(train_env, trained, tmp_path):
    before = (trained / "adapter.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="is not empty: pass --resume .* or --force"):
        run_in_process(train_args(train_env, trained, "--steps", "1"))
    assert (trained / "adapter.safetensors").read_bytes() == before


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def test_ctrl_c_keeps_the_last_checkpoint(train_env, tmp_path):
    out = tmp_path / "interrupted"
    log = tmp_path / "log.txt"
    proc = _spawn([sys.executable, "-m", "moa_attention.train", *train_args(train_env, out, "--steps", "100000",
                                                                             "--checkpoint-every", "0")], log)
    try:
        def running():
            assert proc.poll() is None, log.read_text()[-3000:]
        wait_for(lambda: (out / "loss_log.csv").exists() and len(log_rows(out)) >= 3, "3 logged training steps",
                 budget_minutes=10, poll=0.5, alive=running)
        proc.send_signal(signal.SIGINT)
        # it finishes the step it is in, writes a checkpoint and exits: minutes on a busy machine
        assert proc.wait(timeout=minutes(10)) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "interrupted at step" in text and "--resume" in text
    (ckpt,) = list((out / "checkpoints").iterdir())
    step = int(ckpt.name.split("_")[1])
    assert step >= 3 and (ckpt / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_two_process_data_parallel_run_writes_one_adapter(train_env, tmp_path):
    out = tmp_path / "ddp"
    log = tmp_path / "ddp.txt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000)]
    proc = _spawn([*torchrun, "-m", "moa_attention.train", *train_args(train_env, out, "--steps", "3",
                                                                         "--checkpoint-every", "0")], log)
    assert proc.wait(timeout=minutes(15)) == 0, log.read_text()[-4000:]
    assert (out / "adapter.safetensors").is_file()
    assert len(list(out.glob("*.safetensors"))) == 1
    from moa_attention.engine.adapter_file import load_adapter
    assert load_adapter(out / "adapter.safetensors").config.expert == "lowrank"


def test_router_loss_gradient_pushes_background_to_the_prior():
    from moa_attention.engine.router import Router
    from moa_attention.training.capture import Captured
    from moa_attention.training.losses import router_loss
    torch.manual_seed(0)
    router = Router(8)
    router.reset_fresh()
    x = torch.randn(1, 16, 8)
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :] = 1.0
    loss = router_loss([Captured("layer", "attn1", router(x), None)], masks, (4, 4))
    loss.backward()
    # raising the personal logit's bias would raise the background share: its gradient is positive
    assert router.fc2.bias.grad[1] > 0 and router.fc2.bias.grad[0] < 0
