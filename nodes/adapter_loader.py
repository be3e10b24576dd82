"""MoA Adapter Loader: a .safetensors adapter from models/moa, validated on load."""
from __future__ import annotations

import os

from ..moa_attention.adapter_io import load_adapter
from .common import ADAPTER_TYPE, CATEGORY, MODEL_FOLDER


class MoAAdapterLoader:
    DESCRIPTION = "Loads a MoA adapter (personalized experts, routers and prompt-fusion MLP) from models/moa."
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER_TYPE,)
    RETURN_NAMES = ("moa_adapter",)
    OUTPUT_TOOLTIPS = ("The MoA adapter, for MoA Apply.",)
    FUNCTION = "load"

    _cache: dict[str, tuple[float, object]] = {}

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"adapter_name": (folder_paths.get_filename_list(MODEL_FOLDER), {
            "tooltip": "A MoA adapter file in ComfyUI/models/moa (made with `python -m moa_attention.train`). "
                       "Press R to refresh the list after copying a file in."})}}

    def load(self, adapter_name: str):
        import folder_paths
        path = folder_paths.get_full_path(MODEL_FOLDER, adapter_name)
        if path is None:
            raise FileNotFoundError(f"MoA adapter '{adapter_name}' is not in any models/moa folder "
                                    f"({folder_paths.get_folder_paths(MODEL_FOLDER)}). Copy it there and press R.")
        mtime = os.path.getmtime(path)
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            adapter = load_adapter(path)
            adapter.name = adapter_name
            self._cache[path] = (mtime, adapter)
        return (self._cache[path][1],)
