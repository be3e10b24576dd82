"""Where ComfyUI is, for the command-line tools that run outside it (trainer, evaluation)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def find_comfyui(explicit: Path | None) -> Path:
    """--comfyui, $COMFYUI_PATH, the ComfyUI this pack is installed in, or the dev checkout's copy."""
    here = Path(__file__).resolve()
    candidates = [explicit, Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None,
                  here.parents[4] if len(here.parents) > 4 else None,  # ComfyUI/custom_nodes/<pack>/moa_attention/comfyui
                  here.parents[2] / ".dev" / "ComfyUI"]
    for c in candidates:
        if c is not None and (c / "comfy" / "model_management.py").is_file():
            return c
    raise SystemExit("cannot find ComfyUI: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")


def put_comfyui_on_path(explicit: Path | None = None, cpu: bool | None = None) -> Path:
    """find_comfyui, put it first on sys.path and, on a machine without CUDA (or cpu=True), tell
    ComfyUI to run on the CPU before comfy.model_management is imported."""
    comfy_dir = find_comfyui(explicit)
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    if cpu or (cpu is None and not _cuda()):
        comfy.cli_args.args.cpu = True
    return comfy_dir


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
