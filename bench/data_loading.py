#!/usr/bin/env python
"""How fast the trainer gets its examples: decoding with 0 vs 2 DataLoader workers, and the
encoder cache cold (decode + encode + write) vs warm (read back, what every epoch after the
first and every --resume does).

A dataset of `--examples` images is written to a temporary folder: by default in FastComposer's
layout (--size px wide textured JPEG photos, segment maps, two people per image whose
references are cut out and augmented, as FFHQ-wide is read), or with --layout manifest the
tests' PNG dataset (support/datasets.py). The tests' SD1.5 files are the encoders (a tiny UNet and TAESD VAE, but the real
CLIP-L text encoder and a full-size, random CLIP ViT-L/14 vision tower). Measured, interleaved
`--repeats` times, each cold fill into a fresh cache folder:

    decode only, 0 / 2 workers     cache.decoded() alone, over the dataset 4 times: what the
                                   workers take off the encoders' process
    decode + N ms idle, 0 / 2 w    the same, the main process sleeping --encoder-ms per example
                                   as it waits on a GPU's encoders: what workers overlap there
    cold fill, 0 / 2 workers       cache.fill_cache() on an empty cache
    warm read                      fill_cache() finding everything, then every example read back

    .venv/bin/python bench/data_loading.py                   # 16 FastComposer images at 1024 px, 2 repeats
    .venv/bin/python bench/data_loading.py --examples 8 --repeats 1   # a smoke run

Results and run conditions: bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))     # support.* (no pytest needed)


DECODE_PASSES = 4          # decode-only runs over the dataset 4 times: worker start-up amortized as in training


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=16, help="dataset rows")
    ap.add_argument("--layout", choices=("fastcomposer", "manifest"), default="fastcomposer",
                    help="FastComposer's (JPEG photos, segment maps, two people cut out per image) or the "
                         "manifest's (PNG pictures, masks and reference photos: tests/support/datasets.py)")
    ap.add_argument("--size", type=int, default=1024, help="the dataset's pictures, in pixels (width)")
    ap.add_argument("--resolution", type=int, default=512, help="the training resolution (--resolution)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median is reported")
    ap.add_argument("--encoder-ms", type=int, default=100,
                    help="a GPU's encoder time per example, simulated by the main process sleeping (its CPU idle)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers: 1)")
    return ap.parse_args()


def write_fastcomposer(root: Path, n: int, size: int) -> Path:
    """n images in FastComposer's layout, as FFHQ-wide's are: a JPEG photo (size x 3/4 size,
    textured so it decodes like a photo), its segment map with two people, and the caption."""
    import json

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    h, w = size * 3 // 4, size
    yy, xx = np.mgrid[:h, :w]
    ids = [f"{100000 + i:010d}" for i in range(n)]
    for image_id in ids:
        (root / image_id[:5]).mkdir(parents=True, exist_ok=True)
        photo = rng.normal(128, 40, (h // 8, w // 8, 3)).clip(0, 255).astype(np.uint8)
        photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC), np.float32)
        photo = (photo + rng.normal(0, 12, photo.shape)).clip(0, 255).astype(np.uint8)
        seg = np.zeros((h, w), np.int32)
        boxes = []
        for sid, cx in ((1, w * 0.3), (2, w * 0.7)):
            rx, ry, cy = w * 0.15, h * 0.4, h * 0.55
            seg[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = sid
            boxes.append([int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)])
        Image.fromarray(photo).save(root / image_id[:5] / f"{image_id}.jpg", quality=90)
        np.save(root / image_id[:5] / f"{image_id}.npy", seg)
        caption = "a woman and a man standing on a street"
        info = {"caption": caption, "segments": [
            {"id": 1, "bbox": boxes[0], "end": caption.index("woman") + 5, "coco_label": "person"},
            {"id": 2, "bbox": boxes[1], "end": caption.index(" man") + 4, "coco_label": "person"}]}
        (root / image_id[:5] / f"{image_id}.json").write_text(json.dumps(info))
    (root / "image_ids_train.txt").write_text("\n".join(ids) + "\n")
    return root


def setup(args: argparse.Namespace, tmp: Path):
    """ComfyUI in-process, the tests' model files, the dataset, the encoders; (cfg, records, encoders)."""
    from support.datasets import write_dataset
    from support.model_factory import prepare_models_tree
    from support.runtime import import_comfy, import_pack
    import_comfy()
    import_pack()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    from comfyui_moa.moa_attention.comfyui.loading import load_base_checkpoint, load_clip_vision
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.dataset import read_dataset
    info = prepare_models_tree(tmp / "base")
    if args.layout == "fastcomposer":
        data = write_fastcomposer(tmp / "data", args.examples, args.size)
    else:
        data = write_dataset(tmp / "data", n=args.examples, size=args.size)
    records, problems = read_dataset(data, augmented=True, thorough=False)     # as the trainer reads it
    assert not problems and len(records) == args.examples, problems
    model, clip, vae, _ = load_base_checkpoint(info["checkpoint_path"])
    encoders = (model, clip, vae, load_clip_vision(info["clip_vision_path"]))
    cfg = TrainConfig(info["checkpoint_path"], info["clip_vision_path"], data, None, resolution=args.resolution)
    return cfg, records, encoders


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_round(cfg, records, encoders, tmp: Path, r: int, encoder_ms: int) -> dict[str, float]:
    """Seconds of each measurement in one round (fresh cache folders for the cold fills)."""
    from dataclasses import replace

    import comfyui_moa.moa_attention.comfyui.subjects as subjects
    from comfyui_moa.moa_attention.training.cache import cached_examples, decoded, fill_cache
    out = {}
    many = records * DECODE_PASSES
    for workers in (0, 2):
        out[f"decode only, {workers} workers"] = timed(lambda: sum(1 for _ in decoded(many, cfg.resolution, workers)))
    for workers in (0, 2):
        out[f"decode + {encoder_ms} ms idle, {workers} w"] = timed(
            lambda: [time.sleep(encoder_ms / 1000) for _ in decoded(many, cfg.resolution, workers)])
    for workers in (2, 0) if r % 2 else (0, 2):
        os.environ["MOA_CACHE_DIR"] = str(tmp / f"cache_{r}_{workers}")
        subjects._FEATURE_CACHE.clear()     # MoA Apply's in-memory feature cache: every cold fill runs CLIP
        c = replace(cfg, workers=workers)
        out[f"cold fill, {workers} workers"] = timed(lambda: fill_cache(c, records, encoders, show=False))

    def warm():
        report = fill_cache(cfg, records, encoders, show=False)
        assert report.encoded == 0, report
        for e in cached_examples(cfg, records):
            assert e.latent.shape[-1] == cfg.resolution // 8
    out["warm read"] = timed(warm)
    return out


def main() -> int:
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="moa_bench_data_"))
    try:
        cfg, records, encoders = setup(args, tmp)
        from comfyui_moa.moa_attention.training.cache import fill_cache
        os.environ["MOA_CACHE_DIR"] = str(tmp / "warmup")
        fill_cache(cfg, records[:2], encoders, show=False)        # first calls load weights: not timed
        rounds = [one_round(cfg, records, encoders, tmp, r, args.encoder_ms) for r in range(args.repeats)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(records)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{n} examples ({args.layout} layout, {args.size} px wide), resolution {args.resolution}, {args.repeats} round(s), "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs")
    print(f"| {'measurement':<28} | {'seconds':>8} | {'examples/s':>10} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 12}|")
    for k, s in median.items():
        count = n * DECODE_PASSES if k.startswith("decode") else n
        print(f"| {k:<28} | {s:8.2f} | {count / s:10.2f} |")
    idle = [median[f"decode + {args.encoder_ms} ms idle, {w} w"] for w in (0, 2)]
    print(f"decode only, 2 vs 0 workers: {median['decode only, 0 workers'] / median['decode only, 2 workers']:.2f}x; "
          f"decode + {args.encoder_ms} ms idle encoder, 2 vs 0 workers: {idle[0] / idle[1]:.2f}x; "
          f"cold fill, 2 vs 0 workers: {median['cold fill, 0 workers'] / median['cold fill, 2 workers']:.2f}x; "
          f"warm read vs cold fill (0 workers): {median['cold fill, 0 workers'] / median['warm read']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
