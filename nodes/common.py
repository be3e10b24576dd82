"""Names shared by the node files: category, custom types, the models/moa folder."""
from __future__ import annotations

import os

CATEGORY = "MoA"
ADAPTER_TYPE = "MOA_ADAPTER"
SUBJECTS_TYPE = "MOA_SUBJECTS"
MODEL_FOLDER = "moa"


def register_model_folder() -> None:
    """models/moa, plus anything extra_model_paths.yaml adds under `moa:` (kept, not replaced)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(exts) | {".safetensors"})
