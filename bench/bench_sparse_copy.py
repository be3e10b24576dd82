#!/usr/bin/env python
"""Sparse soft routing's data movement against the personalized attention kernel it serves.

Sparse soft routing (MoAAttention.sparse_mix) runs the personalized attention only for the routed
pixels of the cond row: their queries against all keys. Moving those pixels costs copies that a
dense path does not make: the routed rows of x and q gathered, the prior's output for them
gathered, and the mixed result scattered back into the layer's output. This bench times, at
SD1.5's attention shapes (cond + uncond batch of 2, 8 heads; attn1's keys are the pixels,
attn2's the 77 prompt tokens), for routed fractions of the pixels:

    kernel      the personalized attention for the routed queries (engine.attention_fn's SDPA)
    copies      what sparse_mix moves for them, as it moves it now (`engine`: index_select and
                index_copy_ into the layer's output in place), and for comparison the earlier
                form (`clone`: advanced indexing, the whole output copied first) and boolean
                masks (`mask`)

summed over the UNet's 16 attn1 and 16 attn2 layers of one call (per level: 5 transformer
blocks at 1/8, 1/16 and 1/32 of the image, 1 at 1/64), one thread by default, the median of
--repeats timings of each op. No ComfyUI: plain torch on the engine's own attention function.

    .venv/bin/python bench/bench_sparse_copy.py                       # 512 and 768 px, 10/30/50 %
    .venv/bin/python bench/bench_sparse_copy.py --sizes 64 --repeats 3   # smoke run, seconds
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))     # support.* (no pytest needed)
from support.runtime import register_pack  # noqa: E402

register_pack()
from comfyui_moa.moa_attention.engine.attention_fn import sdpa_attention  # noqa: E402

HEADS, CONTEXT_TOKENS = 8, 77
#: SD1.5's transformer blocks per UNet call: (downsampling of the latent, channels, blocks)
LEVELS = ((1, 320, 5), (2, 640, 5), (4, 1280, 5), (8, 1280, 1))


def median_ms(fn, repeats: int) -> float:
    fn()                                              # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def routed_pixels(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of round(fraction * n) pixels, as (share > threshold).nonzero() gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: max(1, round(fraction * n))].sort().values


def engine_copies(x, q, prior_out, sel, share, personal) -> tuple:
    """What sparse_mix and hard_personal_attention move for row 0 now: x and q gathered for the
    routed pixels (index_select), the prior's output and the share gathered there, and the mixed
    pixels written back into the output in place (index_copy_). The mix's arithmetic is not
    timed: dense soft routing does it too, for every pixel."""
    xs, qs = x[0].index_select(0, sel)[None], q[0].index_select(0, sel)[None]
    row = prior_out[0]
    prior_sel, s = row.index_select(0, sel), share[0].index_select(0, sel)
    row.index_copy_(0, sel, personal)
    return xs, qs, prior_sel, s


def clone_copies(x, q, prior_out, sel, share, personal) -> tuple:
    """The earlier form: advanced indexing, and the whole output copied before the mix is written."""
    xs, qs = x[0:1, sel], q[0:1, sel]
    out = prior_out.clone()
    prior_sel, s = out[0, sel], share[0, sel]
    out[0, sel] = personal
    return xs, qs, prior_sel, s


def mask_copies(x, q, prior_out, sel_mask, share, personal) -> tuple:
    """engine_copies with a boolean mask instead of indices, the output written in place."""
    xs, qs = x[0][sel_mask][None], q[0][sel_mask][None]
    row = prior_out[0]
    prior_sel, s = row[sel_mask], share[0][sel_mask]
    row[sel_mask] = personal
    return xs, qs, prior_sel, s


def layer_times(n: int, channels: int, keys: int, fraction: float, repeats: int) -> dict[str, float]:
    """ms of the kernel and of each copy form for one attention layer."""
    g = torch.Generator().manual_seed(n + keys)
    x, q, prior_out = (torch.randn(2, n, channels, generator=g) for _ in range(3))
    k, v = torch.randn(1, keys, channels, generator=g), torch.randn(1, keys, channels, generator=g)
    sel = routed_pixels(n, fraction)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sel] = True
    qp = torch.randn(1, sel.numel(), channels, generator=g)
    share, personal = torch.rand(1, n, 1, generator=g), torch.randn(sel.numel(), channels, generator=g)
    return {"kernel": median_ms(lambda: sdpa_attention(qp, k, v, HEADS), repeats),
            "engine": median_ms(lambda: engine_copies(x, q, prior_out, sel, share, personal), repeats),
            "clone": median_ms(lambda: clone_copies(x, q, prior_out, sel, share, personal), repeats),
            "mask": median_ms(lambda: mask_copies(x, q, prior_out, mask, share, personal), repeats)}


def unet_times(size: int, fraction: float, repeats: int) -> dict[str, dict[str, float]]:
    """Per kind (attn1, attn2, both): ms per UNet call of the kernel and the copies."""
    latent = size // 8
    totals = {kind: dict.fromkeys(("kernel", "engine", "clone", "mask"), 0.0) for kind in ("attn1", "attn2")}
    for down, channels, blocks in LEVELS:
        n = (latent // down) ** 2
        for kind, keys in (("attn1", n), ("attn2", CONTEXT_TOKENS)):
            for name, ms in layer_times(n, channels, keys, fraction, repeats).items():
                totals[kind][name] += blocks * ms
    totals["both"] = {name: totals["attn1"][name] + totals["attn2"][name] for name in totals["attn1"]}
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ms per UNet call (16 attn1 + 16 attn2 layers, cond + uncond batch), median of {args.repeats}, "
          f"{torch.get_num_threads()} thread(s); copies = gathers of the routed pixels + the scatter of the mix; "
          f"engine = sparse_mix's copies now, clone = with a full copy of the output, mask = boolean masks")
    print(f"{'size':>5s} {'routed':>6s} {'layers':>6s} {'kernel':>9s} {'copies':>9s} {'ratio':>7s} "
          f"{'clone':>9s} {'ratio':>7s} {'mask':>9s} {'ratio':>7s}")
    for size in args.sizes:
        for fraction in args.fractions:
            for kind, t in unet_times(size, fraction, args.repeats).items():
                k = t["kernel"]
                print(f"{size:5d} {100 * fraction:5.0f}% {kind:>6s} {k:9.2f} {t['engine']:9.2f} {t['engine'] / k:6.1%} "
                      f"{t['clone']:9.2f} {t['clone'] / k:6.1%} {t['mask']:9.2f} {t['mask'] / k:6.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
