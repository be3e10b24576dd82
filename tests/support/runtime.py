"""ComfyUI in-process, the way main.py sets it up, plus this pack as the package `comfyui_moa`.

Shared by tests/conftest.py and bench/ so both run ComfyUI exactly alike."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = Path(os.environ.get("MOA_COMFYUI_DIR", ROOT / ".dev" / "ComfyUI"))
PACK_MODULE = "comfyui_moa"


class ComfyUIMissing(RuntimeError):
    pass


def import_comfy():
    """Import ComfyUI's `nodes` for CPU with SDPA attention (what the server runs with)."""
    if not (COMFY_DIR / "main.py").is_file():
        raise ComfyUIMissing(f"ComfyUI not found at {COMFY_DIR}; run `bash scripts/dev.sh test` "
                             f"(or set MOA_COMFYUI_DIR)")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True   # before comfy's attention module is imported
    import utils.extra_config  # noqa: F401  (must precede `nodes`, as in main.py)
    import nodes
    return nodes


def import_pack():
    """The pack through its own __init__ (registration included), as ComfyUI loads it."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module
