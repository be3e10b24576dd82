"""The MoA engine: router-gated dual-branch attention, adapter format, prompt fusion, trainer.

Pure torch except `comfy_patch` and `comfy_prompt`, which are the only modules that know
ComfyUI. Nothing here imports ComfyUI at import time."""
__version__ = "0.1.0"
