"""MoA Adapter Loader: a .safetensors adapter from models/moa, validated on load."""
from __future__ import annotations

from ..moa_attention.comfyui.adapters import AdapterCache
from .common import ADAPTER_TYPE, CATEGORY, MODEL_FOLDER, refusals, refuse

NODE = "MoA Adapter Loader"


class MoAAdapterLoader:
    DESCRIPTION = "Loads a MoA adapter (personalized experts, routers and prompt-fusion MLP) from models/moa."
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER_TYPE,)
    RETURN_NAMES = ("moa_adapter",)
    OUTPUT_TOOLTIPS = ("The MoA adapter, for MoA Apply.",)
    FUNCTION = "load"

    _cache = AdapterCache()

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
            raise refuse(NODE, f"adapter_name '{adapter_name}' is not in any models/moa folder "
                               f"({folder_paths.get_folder_paths(MODEL_FOLDER)}). Copy it there and press R.")
        with refusals(NODE):
            return (self._cache.get(path, adapter_name),)
