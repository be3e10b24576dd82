"""The layering the README describes, checked by reading every import of the pack's code.

nodes/ -> moa_attention/comfyui/ -> moa_attention/engine/; training/ is offline and nothing but
its command-line entry point imports it; the engine never imports ComfyUI; only nodes/ and
comfyui/ (its bootstrap included) import ComfyUI. Outside the pack, tests, bench, scripts and
experiments import it under one name, `comfyui_moa`, and a test session holds one copy of it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from support.waits import minutes

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_moa"
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "folder_paths",
                   "nodes", "server", "execution", "latent_preview", "node_helpers", "app", "utils"}


def pack_modules() -> dict[str, Path]:
    """Dotted name inside the pack (e.g. 'moa_attention.engine.layer') -> file."""
    files = [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")), *sorted((ROOT / "moa_attention").rglob("*.py"))]
    out = {}
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, is_inside_pack) for every import statement, lazy ones included.
    Relative imports are resolved to dotted names inside the pack."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module or "", False))
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, node.module] if node.module else base)
            if node.module is None:     # from . import a, b
                found += [((f"{target}.{a.name}" if target else a.name), True) for a in node.names]
            else:
                found.append((target, True))
    return found


MODULES = pack_modules()


def layer_of(module: str) -> str:
    for prefix in ("moa_attention.engine", "moa_attention.comfyui", "moa_attention.training",
                   "moa_attention.faces", "moa_attention.evaluation", "moa_attention.scoring", "nodes"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix.split(".")[-1]
    return module


def test_the_engine_never_imports_comfyui_or_the_layers_above_it():
    bad = []
    for name, path in MODULES.items():
        if layer_of(name) != "engine":
            continue
        for target, inside in imports_of(name, path):
            if not inside and target.split(".")[0] in COMFYUI_MODULES:
                bad.append(f"{name} imports {target}")
            if inside and layer_of(target) != "engine":
                bad.append(f"{name} imports {target} ({layer_of(target)} layer)")
    assert not bad, bad


def test_imports_point_one_way_and_nothing_imports_the_trainer():
    allowed = {  # layer -> layers of the pack it may import
        "nodes": {"nodes", "comfyui", "engine", "faces", "scoring"},
        "comfyui": {"comfyui", "engine"},
        "faces": {"faces", "engine"},
        "training": {"training", "comfyui", "engine", "scoring"},
        "evaluation": {"evaluation", "comfyui", "engine", "faces", "scoring"},   # offline CLI; nodes use scoring/
        "scoring": {"scoring", "engine"},
    }
    bad = []
    for name, path in MODULES.items():
        layer = layer_of(name)
        for target, inside in imports_of(name, path):
            if not inside:
                continue
            if name == "moa_attention.train" and target.startswith("moa_attention.training"):
                continue        # `python -m moa_attention.train`, the trainer's entry point
            if layer in allowed and layer_of(target) not in allowed[layer]:
                bad.append(f"{name} ({layer}) imports {target} ({layer_of(target)})")
            if layer not in allowed and layer_of(target) == "training":
                bad.append(f"{name} imports the trainer: {target}")
    assert not bad, bad


def test_no_node_classes_outside_nodes():
    for name, path in MODULES.items():
        if name.startswith("moa_attention"):
            assert "def INPUT_TYPES" not in path.read_text(), f"{name} defines a node class"


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, inside in imports_of(name, path):
            if not inside:
                continue
            while target and target not in MODULES:      # `from .x import name` may name an attribute
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if m.startswith(n + "."):         # a package importing its own submodule is not a cycle
                continue
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_engine_imports_with_plain_torch():
    """In a fresh interpreter without ComfyUI on the path, every engine and scoring module imports
    and no ComfyUI module gets loaded."""
    engine = sorted(n for n in MODULES if layer_of(n) in ("engine", "scoring"))
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            f"[importlib.import_module(m) for m in {engine!r}]; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMFYUI_MODULES)!r}); "
            "print('LOADED', bad)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=minutes(5),
                          cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout


def _files_outside_the_pack(*folders: str) -> list[Path]:
    return [f for folder in folders for f in sorted((ROOT / folder).rglob("*.py"))]


def test_only_nodes_and_the_comfyui_layer_import_comfyui():
    """Training, evaluation, faces and the experiments reach ComfyUI through moa_attention/comfyui/
    (its bootstrap starts ComfyUI for every entry point). bench/ is left out: it measures ComfyUI
    itself, through hooks on ComfyUI's attention and wrappers."""
    bad = []
    for name, path in MODULES.items():
        if layer_of(name) in ("nodes", "comfyui"):
            continue
        bad += [f"{name} imports {target}" for target, inside in imports_of(name, path)
                if not inside and target.split(".")[0] in COMFYUI_MODULES]
    for path in _files_outside_the_pack("experiments"):
        bad += [f"{path.relative_to(ROOT)} imports {target}" for target, inside in imports_of("experiments.x", path)
                if not inside and target.split(".")[0] in COMFYUI_MODULES]
    assert not bad, bad


def test_code_outside_the_pack_imports_it_as_comfyui_moa_only():
    """tests/, bench/, scripts/ and experiments/ import `comfyui_moa.moa_attention`, never a top-level
    `moa_attention` (the `python -m moa_attention.train` commands they start run in processes of
    their own)."""
    bad = []
    for path in _files_outside_the_pack("tests", "bench", "scripts", "experiments"):
        bad += [f"{path.relative_to(ROOT)} imports {target}" for target, inside in imports_of("x", path)
                if not inside and target.split(".")[0] == "moa_attention"]
    assert not bad, bad


def test_a_test_session_loads_each_pack_module_once_under_one_name(pack):
    """After the nodes (the pack's own __init__), the trainer, the evaluation command and the toy
    world are imported, every file of the repository is one module, all under `comfyui_moa` (or
    `experiments`), with one MoAError class; a top-level `moa_attention` import is refused."""
    import importlib
    for module in ("comfyui_moa.moa_attention.training.cli", "comfyui_moa.moa_attention.training.loop",
                   "comfyui_moa.moa_attention.evaluation.cli", "experiments.toy_world.run"):
        importlib.import_module(module)
    from comfyui_moa.moa_attention.engine.errors import MoAError
    from comfyui_moa.nodes import common
    assert common.MoAError is MoAError
    by_file = defaultdict(list)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).is_absolute() and Path(file).resolve().is_relative_to(ROOT):
            by_file[Path(file).resolve()].append(name)
    # the repository's own code; a checkout's .venv/ and .dev/ (ComfyUI) live under ROOT too
    own = [ROOT / "__init__.py", *(ROOT / d for d in ("nodes", "moa_attention", "experiments", "bench", "scripts"))]
    pack_files = {f: names for f, names in by_file.items() if any(f == o or f.is_relative_to(o) for o in own)}
    assert len(pack_files) > 40, sorted(pack_files)
    assert all(len(names) == 1 for names in pack_files.values()), {f: n for f, n in pack_files.items() if len(n) > 1}
    assert all(n.split(".")[0] in ("comfyui_moa", "experiments") for (n,) in pack_files.values()), pack_files
    errors = {m.MoAError for (n,) in pack_files.values() if isinstance(getattr(m := sys.modules[n], "MoAError", None),
                                                                         type)}
    assert errors == {MoAError}
    with pytest.raises(ImportError, match="import the pack as comfyui_moa.moa_attention"):
        importlib.import_module("moa_attention")
