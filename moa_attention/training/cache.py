"""The frozen encoders' outputs, one safetensors file per example, computed once and reused by
every later epoch, run and --resume.

An example's file is named by a key over everything its encoding depends on: the base and
CLIP-vision files, the training resolution, the record's files (path, size, modification time)
and its options (caption, class words, FastComposer segment, box, augmentation). A changed file
or option gives a new key, so a stale file is never read; old files are left for the user to
delete (`$MOA_CACHE_DIR`). Filling runs decoding in DataLoader workers and the encoders in this
process; under torchrun/accelerate rank r of w fills every w-th example (shard)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.errors import MoAInputError
from ..engine.files import atomic_write
from .config import TrainConfig
from .encode import Decoded, Example, decode_record, encode_decoded
from .records import Record

CACHE_VERSION = "v4"      # bump when what goes into an Example changes


def cache_dir() -> Path:
    root = os.environ.get("MOA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "comfyui-moa")
    return Path(root) / "encoded"


def _stamp(path: Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def models_key(cfg: TrainConfig) -> str:
    """What every example's encoding shares: the encoder files, the resolution, this format."""
    return "\n".join([_stamp(cfg.base), _stamp(cfg.clip_vision), f"res={cfg.resolution}", CACHE_VERSION])


def example_key(models: str, rec: Record) -> str:
    h = hashlib.sha256(models.encode())
    h.update(f"\n{rec.cache_tag()}\n".encode())
    for f in rec.cache_files():
        h.update(f"{_stamp(f)}\n".encode())
    return h.hexdigest()[:32]


def cache_paths(cfg: TrainConfig, records: list[Record]) -> list[Path]:
    """Each record's cache file (present or not), in the records' order."""
    models, root = models_key(cfg), cache_dir()
    return [root / f"{example_key(models, rec)}.safetensors" for rec in records]


def shard(n: int, rank: int, world: int) -> list[int]:
    """The indices of n items that rank `rank` of `world` processes takes: every world-th one."""
    if world < 1 or not 0 <= rank < world:
        raise MoAInputError(f"rank {rank} is not one of {world} process(es) (RANK / WORLD_SIZE)")
    return list(range(rank, n, world))


# ----------------------------------------------------------------------------- one file per example

def save_example(path: Path, e: Example) -> None:
    from safetensors.torch import save_file
    tensors = {"latent": e.latent, "text": e.text, "masks": e.masks,
               **{f"feature.{j}": f for j, f in enumerate(e.features)},
               **{k: v for k, v in (("y", e.y), ("pooled", e.pooled)) if v is not None}}     # SDXL
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"positions": json.dumps(e.positions), "caption": e.caption}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_example(path: Path) -> Example:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    positions = json.loads(meta["positions"])
    return Example(t["latent"], t["text"], positions, [t[f"feature.{j}"] for j in range(len(positions))],
                   t["masks"], meta["caption"], t.get("y"), t.get("pooled"))


class CachedExamples(Sequence):
    """The training set as the loop indexes it, read from the cache files on demand (a dataset
    of any size stays on disk; one example is a few hundred KB)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CachedExamples(self.paths[i])
        return load_example(self.paths[i])


def wait_for_files(paths: list[Path], what: str, show: bool = True, poll: float = 2.0) -> None:
    """Until every path exists: other processes are still writing them (torchrun stops the
    whole job when one of its processes fails, so a lost shard does not wait forever)."""
    missing = [p for p in paths if not p.is_file()]
    if missing and show:
        print(f"waiting for {what} ({len(missing)} file(s))", flush=True)
    while missing:
        time.sleep(poll)
        missing = [p for p in missing if not p.is_file()]


def cached_examples(cfg: TrainConfig, records: list[Record]) -> CachedExamples:
    """The records' examples, all of which must be in the cache (fill_cache first)."""
    paths = cache_paths(cfg, records)
    missing = [rec.where for rec, p in zip(records, paths) if not p.is_file()]
    if missing:
        raise MoAInputError(f"{len(missing)} example(s) of {cfg.data} are not in the encoder cache {cache_dir()} "
                            f"(first: {missing[0]}); run the same command with --cache-only first")
    return CachedExamples(paths)


# ----------------------------------------------------------------------------- filling

class _Decoding(torch.utils.data.Dataset):
    """The records to decode, one per item; a failure comes back as its exception, raised again
    in the main process as it was (not wrapped in DataLoader's worker traceback)."""

    def __init__(self, records: list[Record], resolution: int) -> None:
        self.records, self.resolution = records, resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Decoded | Exception:
        try:
            return decode_record(self.records[i], self.resolution)
        except Exception as e:  # noqa: BLE001 (PIL, numpy and the layouts raise many types)
            return e


def decoded(records: list[Record], resolution: int, workers: int):
    """Each record decoded, in order: by `workers` DataLoader processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(_Decoding(records, resolution), batch_size=None, shuffle=False,
                                         num_workers=workers)
    for item in loader:
        if isinstance(item, Exception):
            raise item
        yield item


@dataclass
class FillReport:
    encoded: int            # examples this process encoded and wrote
    already: int            # examples of its shard found in the cache
    seconds: float

    def summary(self, rank: int = 0, world: int = 1) -> str:
        who = f"rank {rank}/{world}: " if world > 1 else ""
        return (f"{who}encoder cache {cache_dir()}: {self.encoded} example(s) cached, {self.already} already cached, "
                f"{self.seconds:.1f} s")


def fill_cache(cfg: TrainConfig, records: list[Record], encoders: tuple, rank: int = 0, world: int = 1,
               show: bool = True) -> FillReport:
    """Encode and write every example of this rank's shard that is not cached yet.
    `encoders`: (model, clip, vae, clip_vision) as ComfyUI loaded them."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    paths = cache_paths(cfg, records)
    mine = shard(len(records), rank, world)
    todo = [i for i in mine if not paths[i].is_file()]
    if todo:
        stream = decoded([records[i] for i in todo], cfg.resolution, cfg.workers)
        for i, d in zip(todo, tqdm(stream, total=len(todo), desc="encoding dataset", disable=not show)):
            try:
                save_example(paths[i], encode_decoded(d, *encoders))
            except OSError as e:
                raise MoAInputError(f"cannot write the encoder cache in {cache_dir()} ({e}); set MOA_CACHE_DIR to "
                                    f"a writable folder") from e
    return FillReport(len(todo), len(mine) - len(todo), time.perf_counter() - t0)
