"""Data loading: decoding in DataLoader workers, the encoder cache (one file per example, keyed
by its files and options), `--cache-only` sharded over processes, and a training run that
reuses the cache instead of encoding."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.datasets import write_dataset
from test_fastcomposer_data import fc_data  # noqa: F401 (the FastComposer-layout folder fixture)
from test_trainer import train_args

N = 3                                        # manifest rows: ranks 0 and 1 of 2 take 2 and 1


def test_shards_are_disjoint_and_cover_every_example():
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.training.cache import shard
    for n in (0, 1, 5, 8, 11):
        for world in (1, 2, 3, 8):
            shards = [shard(n, rank, world) for rank in range(world)]
            flat = [i for s in shards for i in s]
            assert sorted(flat) == list(range(n)) and len(set(flat)) == len(flat), (n, world, shards)
            assert max(map(len, shards)) - min(map(len, shards)) <= 1, shards     # balanced
    assert shard(5, 1, 2) == [1, 3]
    with pytest.raises(MoAInputError, match=r"rank 2 is not one of 2 process\(es\) \(RANK / WORLD_SIZE\)"):
        shard(5, 2, 2)


def test_a_process_waits_for_the_shards_the_others_write(tmp_path, capsys):
    import threading
    import time
    from comfyui_moa.moa_attention.training.cache import wait_for_files
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    paths[0].write_bytes(b"mine")
    writer = threading.Timer(0.3, lambda: [p.write_bytes(b"theirs") for p in paths[1:]])
    t0 = time.perf_counter()
    writer.start()
    wait_for_files(paths, "the others' shards", poll=0.05)
    assert time.perf_counter() - t0 >= 0.3 and all(p.is_file() for p in paths)
    assert "waiting for the others' shards (2 file(s))" in capsys.readouterr().out


@pytest.fixture(scope="module")
def encoders(models_base, comfy):
    from comfyui_moa.moa_attention.comfyui.loading import load_base_checkpoint, load_clip_vision
    _, info = models_base
    model, clip, vae, _ = load_base_checkpoint(info["checkpoint_path"])
    return info, (model, clip, vae, load_clip_vision(info["clip_vision_path"]))


def _pid_logging_decode(monkeypatch, log: Path) -> None:
    """Every decode_record call appends its process id to `log` (workers are forked: they see it)."""
    import comfyui_moa.moa_attention.training.cache as cache
    real = cache.decode_record

    def logged(rec, resolution):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(rec, resolution)
    monkeypatch.setattr(cache, "decode_record", logged)


def test_two_workers_decode_what_one_process_does(fc_data, encoders, tmp_path, monkeypatch):  # noqa: F811
    """Decoding (augmented FastComposer cut-outs included) moves to the workers; the encoded
    examples are the same bit for bit (augmentation is seeded by the example, not the process)."""
    from comfyui_moa.moa_attention.training.cache import cache_paths, fill_cache, load_example
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    info, models = encoders
    records, problems = read_dataset(fc_data[0], "train", augmented=True)
    assert not problems and len(records) == 2
    got = {}
    for workers in (0, 2):
        monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / f"cache{workers}"))
        log = tmp_path / f"pids{workers}.txt"
        _pid_logging_decode(monkeypatch, log)
        cfg = TrainConfig(info["checkpoint_path"], info["clip_vision_path"], fc_data[0], None, resolution=64,
                          workers=workers)
        report = fill_cache(cfg, records, models, show=False)
        assert (report.encoded, report.already) == (2, 0)
        pids = set(log.read_text().split())
        assert (pids == {str(os.getpid())}) == (workers == 0), pids
        got[workers] = [load_example(p) for p in cache_paths(cfg, records)]
    for a, b in zip(got[0], got[2]):
        assert a.caption == b.caption and a.positions == b.positions
        for x, y in [(a.latent, b.latent), (a.text, b.text), (a.masks, b.masks), *zip(a.features, b.features)]:
            assert torch.equal(x, y), a.caption
    assert len(got[0][0].features) == 2           # the two people of the first image


def test_a_failure_in_a_worker_is_raised_as_it_was(fc_data, encoders, tmp_path, monkeypatch):  # noqa: F811
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.training.cache import fill_cache
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    info, models = encoders
    records, _ = read_dataset(fc_data[0], "all", thorough=False)
    (missing,) = [r for r in records if r.image_id == "0000200004"]        # segment 7 is not in its map
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig(info["checkpoint_path"], info["clip_vision_path"], fc_data[0], None, resolution=64, workers=2)
    with pytest.raises(MoAInputError, match=r"^segment 7 is not in the segment map .*0000200004\.npy"):
        fill_cache(cfg, [missing], models, show=False)


@pytest.fixture
def env(models_base, tmp_path, monkeypatch):
    _, info = models_base
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return {"ckpt": info["checkpoint_path"], "clip_vision": info["clip_vision_path"],
            "data": write_dataset(tmp_path / "data", n=N)}


def _cache_only(env, capsys, *extra: str) -> tuple[int, int]:
    """Run --cache-only; (examples cached, already cached) from its summary line."""
    from comfyui_moa.moa_attention.training.cli import main
    args = [a for a in train_args(env, Path("unused"), "--cache-only", "--workers", "2", *extra)]
    i = args.index("--output-dir")
    assert main(args[:i] + args[i + 2:]) == 0
    out = capsys.readouterr().out
    m = re.search(r"encoder cache .*: (\d+) example\(s\) cached, (\d+) already cached, [\d.]+ s", out)
    assert m, out
    return int(m[1]), int(m[2])


def _counting_encoder(monkeypatch) -> list:
    import comfyui_moa.moa_attention.training.cache as cache
    calls, real = [], cache.encode_decoded
    monkeypatch.setattr(cache, "encode_decoded", lambda d, *models: calls.append(d.where) or real(d, *models))
    return calls


def test_cache_only_fills_each_ranks_shard_and_training_then_encodes_nothing(env, comfy, tmp_path, monkeypatch,
                                                                              capsys):
    from test_trainer import run_in_process
    calls = _counting_encoder(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _cache_only(env, capsys) == (1, 0)                     # rows 2 (index 1) of 3
    assert calls == ["manifest.jsonl line 2"]
    monkeypatch.setenv("RANK", "0")
    assert _cache_only(env, capsys) == (2, 0)                     # rows 1 and 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert _cache_only(env, capsys) == (0, N)
    assert len(calls) == N and sorted(calls) == [f"manifest.jsonl line {i}" for i in range(1, N + 1)]
    out = tmp_path / "run"
    assert run_in_process(train_args(env, out, "--steps", "2", "--eval-examples", "2", "--eval-every", "1")) == 0
    assert len(calls) == N, calls                                 # training encoded nothing
    assert f"0 example(s) cached, {N} already cached" in capsys.readouterr().out
    assert (out / "adapter.safetensors").is_file()
    assert run_in_process(train_args(env, out, "--steps", "5", "--eval-examples", "2", "--eval-every", "2",
                                     "--resume")) == 0
    assert len(calls) == N, calls                                 # nor did the resumed run
    rows = _csv(out / "eval_log.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "4", "5"]   # before, every N steps, the last one
    summary = json.loads((out / "summary.json").read_text())
    for key in ("share_auroc", "fg_share", "bg_share", "change_in", "change_out"):
        assert float(rows[-1][key]) == pytest.approx(summary["eval_after"][key], rel=1e-4, abs=1e-9), key
    assert float(rows[0]["change_in"]) == float(rows[0]["change_out"]) == 0.0       # a fresh adapter changes nothing
    assert float(rows[1]["change_in"]) > 0, rows


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_changed_file_or_option_is_encoded_again(env, comfy, monkeypatch, capsys):
    from comfyui_moa.moa_attention.training.cache import cache_paths, load_example
    from comfyui_moa.moa_attention.training.cli import parse_args
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    assert _cache_only(env, capsys) == (N, 0)
    cfg = parse_args(train_args(env, Path("unused")))
    records, _ = read_dataset(env["data"])
    before = load_example(cache_paths(cfg, records)[0]).latent
    image = env["data"] / "images" / "000.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)          # the first picture, inverted
    assert _cache_only(env, capsys) == (1, N - 1)
    after = load_example(cache_paths(cfg, records)[0]).latent
    assert (after - before).abs().mean() > 0.05, "the changed picture's cached latent was reused"
    assert _cache_only(env, capsys, "--resolution", "128") == (N, 0)      # an option every example depends on
    assert _cache_only(env, capsys) == (0, N)                               # the 64 px files are still there
