"""Files: written so that a crash or a reader never sees half of one, and the JSON-lines
manifests (the trainer's dataset, the evaluation folder) read with one rule."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    The temporary file gets the permissions a plain open() would have given (mkstemp makes
    0600, and a ComfyUI service running as another user must still read adapters)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextmanager
def exclusive(fd: int) -> Iterator[None]:
    """Hold an exclusive lock on the open file `fd` for the block, against every writer that takes
    it (other threads and processes alike); where the OS has no flock (Windows) the block runs
    unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class JsonLine:
    """One line of a JSON-lines file: its object, or (value None) why it is not one."""
    line: int                     # 1-based, as an editor shows it
    value: dict | None
    problem: str = ""


def read_json_lines(path: str | os.PathLike) -> list[JsonLine]:
    """Every line of a UTF-8 JSON-lines file but blank ones and `#` comments: its JSON object,
    or the reason it is not one, so a caller can report every bad line at once."""
    out = []
    for i, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            out.append(JsonLine(i, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(value, dict):
            out.append(JsonLine(i, None, f"expected a JSON object, got {type(value).__name__}"))
            continue
        out.append(JsonLine(i, value))
    return out
