"""What the node files share: category, custom types, model folders, how refusals leave a node."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ..moa_attention.engine.errors import MoAError, MoAInputError
from ..moa_attention.engine.finite import require_finite

CATEGORY = "MoA"
ADAPTER_TYPE = "MOA_ADAPTER"
SUBJECTS_TYPE = "MOA_SUBJECTS"
MODEL_FOLDER = "moa"
INSIGHTFACE_FOLDER = "insightface"   # optional face models for MoA Face Align: <folder>/models/<name>/*.onnx


def _register_folder(name: str, extensions: set[str]) -> None:
    """models/<name> first, keeping whatever extra_model_paths.yaml or another pack registered."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, name)
    paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[name] = (paths, set(exts) | extensions)


def register_insightface_folder() -> None:
    """models/insightface: the `root` insightface's FaceAnalysis takes (other packs share it)."""
    _register_folder(INSIGHTFACE_FOLDER, {".onnx"})


def register_model_folder() -> None:
    """models/moa for adapters, and models/insightface for MoA Face Align."""
    _register_folder(MODEL_FOLDER, {".safetensors"})
    register_insightface_folder()


@contextmanager
def refusals(node: str) -> Iterator[None]:
    """Errors of the pack leave a node led by the node's display name, with their type and
    cause kept (ComfyUI shows the type and message in its error dialog)."""
    try:
        yield
    except MoAError as e:
        prefixed = e.with_prefix(node)
        if prefixed is e:           # already names this node (raised by a node-level check)
            raise
        raise prefixed from e


def refuse(node: str, message: str) -> MoAInputError:
    """A node's own input check: `raise refuse("MoA Apply", "routing must be ...")`."""
    return MoAInputError(f"{node}: {message}")


def check_finite(node: str, **inputs) -> None:
    """Refuse NaN/inf in the named IMAGE, MASK or LATENT inputs (None = unconnected), before
    they spread into a black picture or NaN numbers: `check_finite(NODE, image=image)`."""
    for name, value in inputs.items():
        if value is not None:
            with refusals(node):
                require_finite(name, value)
