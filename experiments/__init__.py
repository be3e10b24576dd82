"""Experiments that exercise the trainer end to end (not part of the node pack), run from the
repository root: `python -m experiments.toy_world.run`.

They import the pack as `comfyui_moa`, the name the tests give it (tests/support/runtime.py), so
an experiment run by a test and one run on its own load the same modules under the same name."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from support.runtime import register_pack  # noqa: E402

register_pack()
