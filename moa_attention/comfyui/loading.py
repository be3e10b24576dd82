"""Model files into ComfyUI's objects, for the code that runs outside a graph (the trainer, the
evaluation command): the loaders the nodes use, with the pack's checks and errors. `label` is
how the caller names the file to the user (a command-line option such as --base)."""
from __future__ import annotations

from pathlib import Path

from ..engine.errors import ModelMismatchError, MoAInputError
from .models import check_training_base


def require_file(path: Path, label: str) -> None:
    if not Path(path).is_file():
        raise MoAInputError(f"{label}: file not found: {path}")


def load_base_checkpoint(path: Path, label: str = "checkpoint") -> tuple:
    """(MODEL, CLIP, VAE, Base) of a full SD1.5 or SDXL checkpoint, as Load Checkpoint gives them;
    the trainer's --base, so the refiner, other models and non-EPS ones are refused
    (check_training_base)."""
    import comfy.sd
    require_file(path, label)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    try:
        base = check_training_base(model)
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{label} {path}: {e}") from None
    if clip is None:
        raise ModelMismatchError(f"{label} {path} has no text encoder: use a full {base.label} checkpoint")
    return model, clip, vae, base


def load_clip_vision(path: Path, label: str = "clip vision"):
    """CLIP_VISION, as Load CLIP Vision gives it."""
    import comfy.clip_vision
    require_file(path, label)
    clip_vision = comfy.clip_vision.load(str(path))
    if clip_vision is None:
        raise ModelMismatchError(f"{label} {path} is not a CLIP vision model ComfyUI recognises")
    return clip_vision
