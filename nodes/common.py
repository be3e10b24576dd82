"""Names shared by the node files: category, custom types, the models/moa and models/insightface folders."""
from __future__ import annotations

import os

CATEGORY = "MoA"
ADAPTER_TYPE = "MOA_ADAPTER"
SUBJECTS_TYPE = "MOA_SUBJECTS"
MODEL_FOLDER = "moa"
INSIGHTFACE_FOLDER = "insightface"   # optional face models for MoA Face Align: <folder>/models/<name>/*.onnx


def register_model_folder() -> None:
    """models/moa, plus anything extra_model_paths.yaml adds under `moa:` (kept, not replaced);
    and models/insightface for MoA Face Align."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | {".safetensors"})
    register_insightface_folder()


def register_insightface_folder() -> None:
    """models/insightface (the `root` insightface's FaceAnalysis takes; other packs use the same folder),
    plus whatever extra_model_paths.yaml or another pack registered under `insightface` (kept)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, INSIGHTFACE_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(INSIGHTFACE_FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[INSIGHTFACE_FOLDER] = (paths, set(exts) | {".onnx"})
