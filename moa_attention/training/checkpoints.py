"""Trainer checkpoints without pickle: optimizer state and counters in a .safetensors file.

A resumed run must continue exactly: AdamW moments per parameter (by name), the optimizer's
scalar settings, the global step and the torch RNG state are all stored; the data order,
noise and timesteps are derived from (seed, step), so nothing else is needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..engine.files import atomic_write

STATE_FILE = "trainer_state.safetensors"


def save_trainer_state(path: Path, optimizer: torch.optim.Optimizer, names: dict[int, str], step: int) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        name = names[idx]
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"optim.{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = float(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars),
            "names": json.dumps([names[i] for i in sorted(names)])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> int:
    """Restore the optimizer and the torch RNG in place; returns the step. Metadata keys it does
    not use (older versions also wrote an empty "extra") are ignored."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved_names = json.loads(meta["names"])
    current = [names[i] for i in sorted(names)]
    if saved_names != current:
        raise ValueError(f"checkpoint {path} was saved for other trainable parameters "
                         f"({len(saved_names)} vs {len(current)}); resume with the same --expert/--rank")
    scalars = json.loads(meta["scalars"])
    by_name = {n: i for i, n in names.items()}
    state = {}
    for name, idx in by_name.items():
        entry = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")
                 and k[len(f"optim.{name}."):].count(".") == 0}
        for key, value in scalars.get(name, {}).items():
            entry[key] = torch.tensor(value)
        if entry:
            state[idx] = entry
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def checkpoint_dirs(out: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())


def save_checkpoint(out: Path, adapter, optimizer: torch.optim.Optimizer, names: dict[int, str], step: int,
                    keep: int) -> Path:
    """Adapter (fp32) + optimizer state in checkpoints/step_N; only the newest `keep` stay."""
    from ..engine.adapter_file import save_adapter
    d = out / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, d / "adapter.safetensors", dtype=torch.float32, overwrite=True)
    save_trainer_state(d / STATE_FILE, optimizer, names, step)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return d
