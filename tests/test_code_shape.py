"""The pack's code stays readable in one screen per function: none is over MAX_LINES lines.

Counted from the `def` (or its first decorator) to its last line, docstring included, for
every function and method in the pack's __init__.py, nodes/ and moa_attention/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def pack_files() -> list[Path]:
    return [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")),
            *sorted((ROOT / "moa_attention").rglob("*.py"))]


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function in the file."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                found.append((prefix + child.name, child.lineno, child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def test_the_counter_measures_what_it_claims(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("class A:\n    @staticmethod\n    def f():\n        def g():\n            pass\n"
                   "        return 1\n\n\ndef h(): return 2\n")
    assert function_lengths(src) == [("A.f", 3, 5), ("A.f.g", 4, 2), ("h", 9, 1)]


def test_no_function_in_the_pack_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
            for path in pack_files() for name, line, length in function_lengths(path) if length > MAX_LINES]
    assert not long, f"split these into named steps (at most {MAX_LINES} lines each): {long}"
