"""ComfyUI in-process for every entry point that runs outside ComfyUI's own main.py: the trainer
and evaluation commands, the tests, the bench and the toy-world experiment.

They all start it here, the way main.py does: ComfyUI's folder first on sys.path, the CPU when
there is no CUDA device (the CUDA build of torch dies in comfy.model_management otherwise), SDPA
attention (what the server runs with), and `utils.extra_config` imported before `nodes` (after
`nodes` is imported, `utils` means comfy/utils.py). Once comfy.model_management is imported its
settings are fixed, so a second start only reports where the running ComfyUI lives.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..engine.errors import MoAError


class ComfyUINotFoundError(MoAError, RuntimeError):
    """No ComfyUI folder where the pack looked; the message says how to point at one."""


def find_comfyui(explicit: Path | None = None) -> Path:
    """--comfyui, $COMFYUI_PATH, the ComfyUI this pack is installed in, or the dev checkout's copy."""
    if explicit is not None and not _is_comfyui(explicit):
        raise ComfyUINotFoundError(f"{explicit} is not a ComfyUI folder (it has no comfy/model_management.py): "
                                   f"pass the folder that holds ComfyUI's main.py")
    here = Path(__file__).resolve()
    candidates = [explicit, Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None,
                  here.parents[4] if len(here.parents) > 4 else None,  # ComfyUI/custom_nodes/<pack>/moa_attention/comfyui
                  here.parents[2] / ".dev" / "ComfyUI"]
    for c in candidates:
        if c is not None and _is_comfyui(c):
            return c
    raise ComfyUINotFoundError("cannot find ComfyUI: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")


def _is_comfyui(folder: Path) -> bool:
    return (Path(folder) / "comfy" / "model_management.py").is_file()


def start_comfyui(explicit: Path | None = None, cpu: bool | None = None, with_nodes: bool = False) -> Path:
    """Make ComfyUI importable and configured; returns its folder.

    cpu=None runs on the CPU only when torch sees no CUDA device. with_nodes also imports ComfyUI's
    `nodes` module (the built-in node classes), which the tests and the bench sample through."""
    running = sys.modules.get("comfy.model_management")
    if running is not None:
        comfy_dir = Path(running.__file__).resolve().parents[1]
    else:
        comfy_dir = find_comfyui(explicit)
        if str(comfy_dir) not in sys.path:
            sys.path.insert(0, str(comfy_dir))
        _configure(cpu)
    if with_nodes and "nodes" not in sys.modules:
        import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does)
        import nodes  # noqa: F401
    return comfy_dir


def _configure(cpu: bool | None) -> None:
    """ComfyUI's command-line defaults, set before comfy.model_management reads them."""
    import comfy.cli_args
    if cpu or (cpu is None and not _cuda()):
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
