"""The pack as the package `comfyui_moa` (the name its nodes run under in the tests) and ComfyUI
in-process, started by the pack's own bootstrap (moa_attention/comfyui/bootstrap.py).

Shared by tests/conftest.py, bench/ and experiments/, so every one of them imports one copy of
the pack's modules under one name and runs ComfyUI exactly alike."""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = Path(os.environ.get("MOA_COMFYUI_DIR", ROOT / ".dev" / "ComfyUI"))
PACK_MODULE = "comfyui_moa"


class ComfyUIMissing(RuntimeError):
    pass


class OnePackName(importlib.abc.MetaPathFinder):
    """Refuses the pack's folders as top-level packages (`moa_attention`, found through the current
    directory or the repository root on sys.path): a second name would load every module twice,
    with two MoAError classes and two feature caches."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "moa_attention":
            raise ImportError(f"import the pack as {PACK_MODULE}.moa_attention here (the name its nodes run "
                              f"under), not as the top-level moa_attention", name=fullname)
        return None


def register_pack():
    """`comfyui_moa` importable without running the pack's __init__ (which registers the nodes and
    needs ComfyUI), so `comfyui_moa.moa_attention.engine` imports with plain torch; and, for the
    rest of the process, that name as the only one (OnePackName)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    if not any(isinstance(f, OnePackName) for f in sys.meta_path):
        sys.meta_path.insert(0, OnePackName())
    spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    return module


def import_comfy():
    """ComfyUI's `nodes`, for the CPU with SDPA attention (what the server runs with)."""
    if not (COMFY_DIR / "main.py").is_file():
        raise ComfyUIMissing(f"ComfyUI not found at {COMFY_DIR}; run `bash scripts/dev.sh test` "
                             f"(or set MOA_COMFYUI_DIR)")
    register_pack()
    from comfyui_moa.moa_attention.comfyui.bootstrap import start_comfyui
    start_comfyui(COMFY_DIR, cpu=True, with_nodes=True)
    import nodes
    return nodes


def import_pack():
    """The pack through its own __init__ (registration included), as ComfyUI loads it; once."""
    module = register_pack()
    if not hasattr(module, "NODE_CLASS_MAPPINGS"):
        module.__spec__.loader.exec_module(module)
    return module
