"""ComfyUI in-process for the experiment (its UNet classes and noise schedule)."""
from __future__ import annotations

import sys

import torch


def import_comfy(device: str = "auto"):
    """Put ComfyUI on sys.path (the trainer's own lookup) and import comfy for `device`."""
    from moa_attention.training.cli import find_comfyui
    comfy_dir = find_comfyui(None)
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import comfy.supported_models
    return comfy
