"""Names shared by the node files: category, custom types, the model folders."""
from __future__ import annotations

import os

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
