#!/usr/bin/env python
"""Cost of MoA on a full-size SD1.5 or SDXL UNet (random weights), measured inside ComfyUI.

One process builds the SD1.5 UNet architecture (859.5M params, random weights, fp32), or with
--base sdxl the SDXL base UNet (2.57B params), with ComfyUI's own classes, then samples 1 step (cfg > 1, so cond + uncond run as one batch-2 UNet
call) on each configuration (unpatched, soft/<expert>, hard/<expert>: see unet.py),
interleaved, `--repeats` times; with --sparse-threshold also sparse/<expert> (sparse soft routing),
and with --router-share-profile toy the soft routers' shares spread as a trained router's.

Reported per configuration: UNet seconds per step (the APPLY_MODEL call, MoA's wrapper
included), the ratio vs unpatched (median of the per-repeat ratios, with their min-max), the
drift-corrected "in-step" ratio, CPU time, sampler wall seconds, peak RSS growth, the tensor
high-water mark and MoA's memory overhead vs the adapter size (report.py); then where MoA's
extra time goes (router, expert, mix), from torch.profiler regions (timing.py).

    .venv/bin/python bench/bench_moa.py --quick            # tiny UNet, seconds
    .venv/bin/python bench/bench_moa.py                    # full SD1.5, lowrank r64, minutes on a CPU
    .venv/bin/python bench/bench_moa.py --expert both      # + full experts
    .venv/bin/python bench/bench_moa.py --sparse-threshold 0.05 --router-share-profile toy
    .venv/bin/python bench/bench_moa.py --base sdxl --size 1024 --memory rss   # SDXL, ~11 GiB of weights

Results and how to read them: bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from collections import defaultdict

import report
from memory import PeakRSS, human, live_tensor_peak_mode, rss_after_trim
from timing import StepInstruments, profiled
from unet import (COMFY_DIR, ComfyUIMissing, adapter_bytes, build_configs, import_comfy, import_pack, make_adapter,
                  make_conditioning, unet_config)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=("sd15", "sdxl"), default="sd15",
                    help="the UNet architecture: SD1.5, or the SDXL base (2048-wide prompts with a pooled output)")
    ap.add_argument("--quick", action="store_true", help="tiny UNet (model_channels 32, 2 levels) at 128 px: a smoke run")
    ap.add_argument("--size", type=int, default=None,
                    help="image size in pixels (latent = size/8); default 512 (SDXL 1024), 128 with --quick")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps per measurement (1 step = 1 batch-2 UNet call)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the median is reported")
    ap.add_argument("--expert", choices=("lowrank", "full", "both"), default="lowrank")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--personal-fraction", type=float, default=0.3, help="share of the image routed to the expert (hard)")
    ap.add_argument("--sparse-threshold", type=float, default=0.0,
                    help="also time sparse soft routing (sparse/<expert>) with this threshold; 0 = not timed")
    ap.add_argument("--router-share-profile", choices=("uniform", "toy"), default="uniform",
                    help="soft/sparse routers' shares: ~1 on every pixel (uniform), or distributed as a trained "
                         "toy-world router's (toy: > 0.001 on 86%%, > 0.01 on 54%%, > 0.05 on 32%% of pixels)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--warmup", choices=("all", "one", "none"), default="one",
                    help="untimed warm-up steps: every configuration, the unpatched one only (default), or none")
    ap.add_argument("--memory", choices=("separate", "inline", "rss"), default="separate",
                    help="tensor high-water tracking (a Python hook on every op, slow): in one extra untimed step "
                         "per configuration (default), inside the timed steps, or not at all (RSS only)")
    args = ap.parse_args()
    args.size = args.size or (128 if args.quick else 1024 if args.base == "sdxl" else 512)
    if args.size % 8:
        ap.error("--size must be a multiple of 8")
    if not 0.0 <= args.sparse_threshold <= 0.5:
        ap.error("--sparse-threshold must be in [0, 0.5] (0 = no sparse configuration)")
    return args


class Bench:
    """The configurations and one sampling run of any of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        self.args, self.latent = args, args.size // 8
        self.nodes = import_comfy()
        import_pack()
        from support.model_factory import build_sd15_model_patcher, build_sdxl_model_patcher
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.rss = PeakRSS()
        label = "SDXL" if args.base == "sdxl" else "SD1.5"
        print(f"building the {'tiny' if args.quick else 'full-size'} {label} UNet (random weights, fp32) ...", flush=True)
        t0 = time.perf_counter()
        config = unet_config(args.quick, args.base)
        base = (build_sdxl_model_patcher(config, seed=0, head_channels=32 if args.quick else 64, dtype=torch.float32)
                if args.base == "sdxl" else build_sd15_model_patcher(config, seed=0, dtype=torch.float32))
        dm = base.get_model_object("diffusion_model")
        print(f"  {sum(p.numel() for p in dm.parameters()) / 1e6:.1f}M params in {time.perf_counter() - t0:.1f} s",
              flush=True)
        self.cond = make_conditioning(self.latent, args.personal_fraction, args.router_share_profile, args.base)
        print_share_profile(self.cond.soft_region, args.sparse_threshold)
        adapters, self.adapter_sizes = {}, {}
        for ex in (["lowrank", "full"] if args.expert == "both" else [args.expert]):
            r0 = rss_after_trim()
            adapters[ex] = make_adapter(dm, ex, args.rank, seed=0)
            grew = rss_after_trim() - r0
            self.adapter_sizes[ex] = adapter_bytes(adapters[ex])
            n = sum(p.numel() for p in adapters[ex].parameters())
            print(f"  adapter {ex}{f' r{args.rank}' if ex == 'lowrank' else ''}: {n / 1e6:.2f}M params, "
                  f"{human(self.adapter_sizes[ex])} (RSS grew {human(grew)} building it)", flush=True)
        self.instruments = StepInstruments()
        self.configs = build_configs(base, adapters, self.cond, self.instruments, args.sparse_threshold)
        self.latent_in = {"samples": torch.zeros(1, 4, self.latent, self.latent)}

    def run_step(self, name: str, track: bool = False) -> dict:
        """Sample `--steps` steps on one configuration, profiled; `track` adds the tensor high-water hook."""
        import torch
        from comfyui_moa.moa_attention.comfyui.patch import get_controller
        self.instruments.calls.clear()
        out: dict = {}
        tracker = live_tensor_peak_mode() if track else contextlib.nullcontext()
        # the server samples under inference_mode; the profiler's parsing stays outside the RSS measure
        with profiled() as prof, self.rss.measure(out), torch.inference_mode(), tracker:
            t = time.perf_counter()
            (latent,) = self.nodes.common_ksampler(self.configs[name], 42, self.args.steps, 7.0, "euler", "normal",
                                                   self.cond.positive, self.cond.negative, self.latent_in)
            out["wall"] = time.perf_counter() - t
        out["samples"] = latent["samples"]
        calls = list(self.instruments.calls)
        out.update(tensor_peak=tracker.peak if track else None, calls=calls, regions=prof.regions, events=prof.n_events,
                   unet=sum(c["s"] for c in calls), unet_cpu=sum(c["cpu"] for c in calls),
                   load=os.getloadavg()[0], routed=None)
        ctrl = get_controller(self.configs[name])
        if ctrl is not None:
            if not ctrl.recorder.layers or not prof.regions.counts.get("moa.router"):
                raise RuntimeError(f"{name}: MoA did not personalize the positive prompt; nothing was measured")
            out["routed"] = float(ctrl.recorder.average()[0].mean())
        return out


def print_share_profile(soft_region, threshold: float) -> None:
    """The soft/sparse routers' share distribution over the latent's pixels (the region times a
    router share of ~1; every UNet level sees the same cells)."""
    if soft_region is None:
        print("  router share profile: uniform (share ~1 on every pixel: sparse routing skips nothing)", flush=True)
        return
    above = [(t, float((soft_region > t).float().mean())) for t in sorted({0.001, 0.01, 0.05, threshold} - {0.0})]
    print("  router share profile: toy, share > " + ", > ".join(f"{t:g} on {100 * f:.1f}%" for t, f in above)
          + f" of the pixels; mean {float(soft_region.mean()):.3f}", flush=True)


def print_sparse_difference(results: dict[str, list[dict]]) -> None:
    """How far sparse soft routing's sampled latent is from dense soft's (same seed, last repeat),
    beside how far dense soft is from the unpatched model's."""
    for name in results:
        kind, _, ex = name.partition("/")
        if kind != "sparse":
            continue
        sparse, dense = results[name][-1]["samples"], results[f"soft/{ex}"][-1]["samples"]
        base = results["unpatched"][-1]["samples"]
        print(f"\n{name} vs soft/{ex}: sampled latent max |diff| {float((sparse - dense).abs().max()):.3g}, mean "
              f"{float((sparse - dense).abs().mean()):.3g} (soft/{ex} vs unpatched: max "
              f"{float((dense - base).abs().max()):.3g}, mean {float((dense - base).abs().mean()):.3g})")


def log_line(prefix: str, name: str, r: dict) -> str:
    batches = sorted({c["batch"] for c in r["calls"]})
    return (f"  {prefix} {name:14s} unet {r['unet']:7.2f} s  cpu {r['unet_cpu']:7.2f} s  wall {r['wall']:7.2f} s  "
            f"load {r['load']:.2f}  calls {len(r['calls'])} batch {batches}  profiled ops {r['events']}  "
            f"peak +{human(r['rss_peak'] - r['rss_before'])}")


def main() -> int:
    args = parse_args()
    t_start = time.perf_counter()
    print(f"importing ComfyUI from {COMFY_DIR} ...", flush=True)
    try:
        bench = Bench(args)
    except ComfyUIMissing as e:
        print(e, file=sys.stderr)
        return 1
    import torch
    names = list(bench.configs)
    print(f"\n{args.base}: {len(names)} configurations x {args.repeats} repeats, {args.steps} step(s) each, "
          f"{args.size}x{args.size} px (latent {bench.latent}x{bench.latent}), batch 2 (cond+uncond), fp32, "
          f"{torch.get_num_threads()} threads, SDPA; load avg {os.getloadavg()[0]:.2f}", flush=True)
    if args.warmup != "none":
        for name in names if args.warmup == "all" else names[:1]:
            print(log_line("warm-up", name, bench.run_step(name)), flush=True)
    results: dict[str, list[dict]] = defaultdict(list)
    for rep in range(args.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):     # alternate the order too
            results[name].append(bench.run_step(name, track=args.memory == "inline"))
            print(log_line(f"rep {rep + 1}", name, results[name][-1]), flush=True)
    results = {name: results[name] for name in names}
    tensor_peaks: dict[str, int] = {}
    if args.memory != "rss":
        for name in names:
            runs = results[name] if args.memory == "inline" else [bench.run_step(name, track=True)]
            tensor_peaks[name] = max(r["tensor_peak"] for r in runs)
            print(f"  memory {name:14s} tensor high-water {human(tensor_peaks[name])}"
                  + (f" (untimed step, {runs[0]['unet']:.2f} s with the hook)" if args.memory == "separate" else ""),
                  flush=True)

    report.print_intro(results, args.steps, tensor_peaks, bench.rss.exact)
    report.print_table(results, tensor_peaks, bench.adapter_sizes)
    report.print_breakdown(results)
    print_sparse_difference(results)
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; process peak RSS "
          f"{human(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}; "
          f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
