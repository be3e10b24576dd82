#!/usr/bin/env python
"""Cost of MoA on a full-size SD1.5 UNet (random weights), measured inside ComfyUI.

One process builds the SD1.5 UNet architecture (859.5M params, random weights, fp32) with
ComfyUI's own classes, then samples 1 step (cfg > 1, so cond + uncond run as one batch-2 UNet
call) on each configuration, interleaved, `--repeats` times:

    unpatched            the plain model
    soft/<expert>        MoA, soft routing, no region: every pixel of the cond row is mixed
    hard/<expert>        MoA, hard routing, a region mask over ~30% of the image and the router
                         forced to "personal" inside it: the expert runs for those pixels only

The positive conditioning is exactly the binding's `plain` tensor, so MoA's DIFFUSION_MODEL
wrapper personalizes the cond row (the uncond row always stays prior-only).

Reported per configuration (min over repeats): UNet seconds per step (the APPLY_MODEL call,
MoA wrapper included), sampler wall seconds, ratio vs unpatched, peak RSS growth during the
step (VmHWM reset through /proc/self/clear_refs), and MoA memory overhead = the extra
transient memory vs unpatched + the adapter's resident bytes, compared with the adapter size.
A breakdown shows where MoA spends its extra time (router, expert projections, personal
attention, indexing/mixing), from class-level timers installed by this script only.

    .venv/bin/python bench/bench_moa.py --quick            # tiny UNet, seconds
    .venv/bin/python bench/bench_moa.py                    # full SD1.5, lowrank r64, ~4 min on 2 cores
    .venv/bin/python bench/bench_moa.py --expert both      # + full experts, ~7 min on 2 cores
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))     # support.* (no pytest needed)
from support.runtime import COMFY_DIR, PACK_MODULE  # noqa: E402

TARGETS = {"soft": 1.35, "hard": 1.15, "memory": 1.15}


# --------------------------------------------------------------------------
# ComfyUI + pack, in-process (as tests/conftest.py does)
# --------------------------------------------------------------------------

def import_comfy():
    from support.runtime import ComfyUIMissing
    from support.runtime import import_comfy as _import
    try:
        nodes = _import()
    except ComfyUIMissing as e:
        sys.exit(str(e))
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    return nodes


def import_pack():
    from support.runtime import import_pack as _import
    return _import()


def full_sd15_unet_config() -> dict:
    """comfy/model_detection.py's SD15 dict (the real SD1.5 UNet), without dtype."""
    from support.model_factory import tiny_unet_config
    cfg = tiny_unet_config(model_channels=320, levels=4, transformer_depth_middle=True)
    cfg.update(num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    return cfg


def quick_unet_config() -> dict:
    from support.model_factory import tiny_unet_config
    return tiny_unet_config(model_channels=32, levels=2, transformer_depth_middle=True)


# --------------------------------------------------------------------------
# memory: peak RSS of one step
# --------------------------------------------------------------------------

_libc = None


def trim_heap() -> None:
    """Give freed heap pages back to the OS so the next step's RSS growth is its own."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRSS:
    """Peak RSS over a block: VmHWM reset by /proc/self/clear_refs (exact), else a psutil
    sampling thread (5 ms)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False

    @contextmanager
    def measure(self, out: dict):
        trim_heap()
        out["rss_before"] = rss0 = _status_kb("VmRSS")
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            yield
            out["rss_peak"] = _status_kb("VmHWM")
        else:
            import threading
            import psutil
            proc, peak, stop = psutil.Process(), [rss0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    stop.wait(0.005)
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            try:
                yield
            finally:
                stop.set()
                t.join()
            out["rss_peak"] = peak[0]


def live_tensor_peak_mode():
    """A TorchDispatchMode that tracks the bytes of tensor storages allocated while it is
    active and still alive: `peak` is the high-water mark of that, exact and deterministic
    (unlike RSS, which glibc's heap makes noisy by tens of MiB). Kernel-internal workspaces
    (e.g. inside SDPA) are not seen; they are the same for the prior and the expert."""
    import weakref
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def key_of(t):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None, 0
        return (st.data_ptr(), t.device), st.nbytes()

    class LiveTensorPeak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict = {}        # storage key -> [python tensors alive, nbytes]
            self.live = 0
            self.peak = 0

        def _release(self, key) -> None:
            e = self.refs.get(key)
            if e is not None:
                e[0] -= 1
                if e[0] == 0:
                    self.live -= e[1]
                    del self.refs[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = None
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                key, n = key_of(t)
                if key is None or n == 0 or key[0] == 0:
                    continue
                e = self.refs.get(key)
                if e is None:
                    if inputs is None:       # a view of / in-place on an untracked input: no new memory
                        inputs = {key_of(a)[0] for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
                    if key in inputs:
                        continue
                    e = self.refs[key] = [0, n]
                    self.live += n
                    self.peak = max(self.peak, self.live)
                e[0] += 1
                weakref.finalize(t, self._release, key)
            return out

    return LiveTensorPeak()


# --------------------------------------------------------------------------
# time breakdown: class-level timers (this process only; the pack is not modified)
# --------------------------------------------------------------------------

class Breakdown:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.in_mix = False
        self.routed = [0.0, 0]        # personal pixels, pixels (hard routing, personalized rows)

    def reset(self) -> None:
        self.t.clear()
        self.n.clear()
        self.routed = [0.0, 0]

    def add(self, key: str, dt: float) -> None:
        self.t[key] += dt
        self.n[key] += 1


def install_timers(bd: Breakdown, pack) -> None:
    import comfy.ldm.modules.attention as comfy_attn
    layer_mod = sys.modules[f"{PACK_MODULE}.moa_attention.layer"]
    router_mod = sys.modules[f"{PACK_MODULE}.moa_attention.router"]
    experts_mod = sys.modules[f"{PACK_MODULE}.moa_attention.experts"]
    MoAAttention, Router, PersonalExpert = layer_mod.MoAAttention, router_mod.Router, experts_mod.PersonalExpert
    pc = time.perf_counter

    def timed(cls, name, key_fn):
        orig = getattr(cls, name)

        def wrapper(self, *a, **kw):
            t0 = pc()
            try:
                return orig(self, *a, **kw)
            finally:
                bd.add(key_fn(self), pc() - t0)
        wrapper.__wrapped__ = orig
        setattr(cls, name, wrapper)

    timed(comfy_attn.CrossAttention, "forward", lambda s: "attention layers (whole forward)")
    timed(MoAAttention, "forward", lambda s: "attention layers (whole forward)")
    timed(Router, "forward", lambda s: "  router MLP")
    orig_project = PersonalExpert.project

    def project(self, name, *a, **kw):
        t0 = pc()
        try:
            return orig_project(self, name, *a, **kw)
        finally:
            dt = pc() - t0
            bd.add("  expert projections", dt)
            bd.add(f"    {name}", dt)
    PersonalExpert.project = project

    # the attention kernel, looked up at call time by CrossAttention.forward and by MoA alike
    for fname in ("optimized_attention", "optimized_attention_masked"):
        orig_fn = getattr(comfy_attn, fname)

        def kernel(*a, _orig=orig_fn, **kw):
            t0 = pc()
            try:
                return _orig(*a, **kw)
            finally:
                bd.add("  personal attention kernel" if bd.in_mix else "prior attention kernel", pc() - t0)
        setattr(comfy_attn, fname, kernel)

    orig_mix = MoAAttention.mix

    def mix(self, *a, **kw):
        t0 = pc()
        bd.in_mix = True
        try:
            return orig_mix(self, *a, **kw)
        finally:
            bd.in_mix = False
            bd.add("MoA mix() total", pc() - t0)
            bd.add(f"  mix() {self.kind}", pc() - t0)
    MoAAttention.mix = mix

    orig_hard_mix = MoAAttention.hard_mix

    def hard_mix(self, *a, **kw):      # hard routing: prior and expert share one pass over the pixels
        t0 = pc()
        try:
            return orig_hard_mix(self, *a, **kw)
        finally:
            bd.add("MoA hard_mix() (prior + expert)", pc() - t0)
    MoAAttention.hard_mix = hard_mix

    patch_mod = sys.modules[f"{PACK_MODULE}.moa_attention.comfy_patch"]
    orig_state = patch_mod.build_call_state

    def build_call_state(*a, **kw):
        t0 = pc()
        try:
            return orig_state(*a, **kw)
        finally:
            bd.add("MoA call state (wrapper)", pc() - t0)
    patch_mod.build_call_state = build_call_state

    orig_hard = layer_mod.hard_route

    def hard_route(share):
        out = orig_hard(share)
        bd.routed[0] += float(out.sum())
        bd.routed[1] += out.numel()
        return out
    layer_mod.hard_route = hard_route


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

def adapter_bytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in list(adapter.parameters()) + list(adapter.buffers()))


def make_adapter(diffusion_model, expert: str, rank: int, seed: int):
    """A fresh adapter, perturbed so it is not the identity: expert weights moved, routers
    biased towards the personal expert (share ~0.9997 everywhere)."""
    import torch
    from comfyui_moa.moa_attention.adapter import init_adapter_from_unet
    adapter = init_adapter_from_unet(diffusion_model, expert=expert, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lw in adapter.layers.values():
            lw.router.fc2.weight.normal_(0.0, 1e-3, generator=g)
            lw.router.fc2.bias.copy_(torch.tensor([0.0, 8.0]))
            for p in lw.expert.proj.values():
                if expert == "lowrank":
                    p.up.weight.normal_(0.0, 0.01, generator=g)
                else:
                    p.weight.add_(torch.randn(p.weight.shape, generator=g) * 0.01 * float(p.weight.std()))
    adapter.eval().requires_grad_(False)
    return adapter


def region_mask(latent: int, fraction: float):
    """[H, W] latent-space mask: a rectangle of a x b cells on an 8 x 8 grid, a*b/64 closest to
    `fraction` (0.3 -> 4 x 5 = 31.25%). With latent % 8 == 0 every UNet level of a 64-latent
    (64, 32, 16, 8) sees exactly the same share after area pooling, so hard routing sends the
    same fraction of pixels to the expert in every layer."""
    import torch
    m = torch.zeros(latent, latent)
    if latent % 8:
        m[: max(1, round(latent * fraction))] = 1.0
        return m
    a, b = min(((a, b) for a in range(1, 9) for b in range(a, 9)), key=lambda ab: abs(ab[0] * ab[1] / 64 - fraction))
    u = latent // 8
    m[: a * u, : b * u] = 1.0
    return m


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def human(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet (model_channels 32, 2 levels) at 128 px: a smoke run")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (latent = size/8); default 512, 128 with --quick")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps per measurement (1 step = 1 batch-2 UNet call)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the minimum is reported")
    ap.add_argument("--expert", choices=("lowrank", "full", "both"), default="lowrank")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--personal-fraction", type=float, default=0.3, help="share of the image routed to the expert (hard)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--warmup", choices=("all", "one", "none"), default="one",
                    help="untimed warm-up steps: every configuration, the unpatched one only (default), or none")
    ap.add_argument("--memory", choices=("separate", "inline", "rss"), default="separate",
                    help="tensor high-water tracking (a Python hook on every op, slow): in one extra untimed step "
                         "per configuration (default), inside the timed steps, or not at all (RSS only)")
    args = ap.parse_args()
    size = args.size or (128 if args.quick else 512)
    if size % 8:
        ap.error("--size must be a multiple of 8")
    latent = size // 8

    t_start = time.perf_counter()
    print(f"importing ComfyUI from {COMFY_DIR} ...", flush=True)
    nodes = import_comfy()
    import torch
    from tqdm import tqdm
    pack = import_pack()
    from comfy.patcher_extension import WrappersMP
    from comfyui_moa.moa_attention.call_state import SubjectBinding
    from comfyui_moa.moa_attention.comfy_patch import apply_moa, get_controller
    from support.model_factory import build_sd15_model_patcher
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mem = PeakRSS()

    cfg = quick_unet_config() if args.quick else full_sd15_unet_config()
    print(f"building the {'tiny' if args.quick else 'full-size SD1.5'} UNet (random weights, fp32) ...", flush=True)
    t0 = time.perf_counter()
    base = build_sd15_model_patcher(cfg, seed=0, dtype=torch.float32)
    dm = base.get_model_object("diffusion_model")
    n_params = sum(p.numel() for p in dm.parameters())
    print(f"  {n_params / 1e6:.1f}M params in {time.perf_counter() - t0:.1f} s", flush=True)

    # conditioning: positive == binding.plain exactly; negative is another prompt
    g = torch.Generator().manual_seed(123)
    plain = torch.randn(77, 768, generator=g)
    fused = plain.clone()
    fused[5:7] += torch.randn(2, 768, generator=g)          # two "subject" tokens
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    positive = [[plain[None].clone(), {}]]
    region = region_mask(latent, args.personal_fraction)

    experts = ["lowrank", "full"] if args.expert == "both" else [args.expert]
    adapters, sizes, resident = {}, {}, {}
    for ex in experts:
        trim_heap()
        r0 = _status_kb("VmRSS")
        adapters[ex] = make_adapter(dm, ex, args.rank, seed=0)
        trim_heap()
        resident[ex] = _status_kb("VmRSS") - r0
        sizes[ex] = adapter_bytes(adapters[ex])
        n = sum(p.numel() for p in adapters[ex].parameters())
        print(f"  adapter {ex}{f' r{args.rank}' if ex == 'lowrank' else ''}: {n / 1e6:.2f}M params, "
              f"{human(sizes[ex])} (RSS grew {human(resident[ex])} building it)", flush=True)

    # configurations, each a clone of `base` with an APPLY_MODEL timer outside MoA's wrapper
    calls: list[dict] = []

    def apply_timer(executor, x, *a, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = executor(x, *a, **kw)
        topts = a[4] if len(a) > 4 else kw.get("transformer_options", {})
        calls.append({"s": time.perf_counter() - t, "cpu": time.process_time() - c, "batch": int(x.shape[0]),
                      "cond_or_uncond": list(topts.get("cond_or_uncond") or [])})
        return out

    configs: dict[str, object] = {}
    m = base.clone()
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench", apply_timer)
    configs["unpatched"] = m
    for ex in experts:
        soft = apply_moa(base, adapters[ex], [SubjectBinding(plain, fused)], adapter_name=f"bench-{ex}")
        hard = apply_moa(base, adapters[ex], [SubjectBinding(plain, fused, region)], hard_routing=True,
                         adapter_name=f"bench-{ex}")
        for name, mm in ((f"soft/{ex}", soft), (f"hard/{ex}", hard)):
            mm.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench", apply_timer)
            configs[name] = mm

    bd = Breakdown()
    install_timers(bd, pack)
    latent_in = {"samples": torch.zeros(1, 4, latent, latent)}

    import contextlib

    def run(name: str, track: bool = False) -> dict:
        calls.clear()
        bd.reset()
        out: dict = {}
        t = time.perf_counter()
        tracker = live_tensor_peak_mode() if track else None
        with torch.inference_mode(), mem.measure(out), (tracker or contextlib.nullcontext()):     # the server samples under inference_mode
            nodes.common_ksampler(configs[name], 42, args.steps, 7.0, "euler", "normal", positive, negative, latent_in)
        out["wall"] = time.perf_counter() - t
        out["tensor_peak"] = tracker.peak if tracker else None
        out["unet"] = sum(c["s"] for c in calls)
        out["unet_cpu"] = sum(c["cpu"] for c in calls)
        out["load"] = os.getloadavg()[0]
        out["calls"] = list(calls)
        out["breakdown"] = dict(bd.t)
        out["routed"] = bd.routed[0] / bd.routed[1] if bd.routed[1] else None
        ctrl = get_controller(configs[name])
        if ctrl is not None and not ctrl._matched_this_run:
            raise RuntimeError(f"{name}: MoA did not recognise the positive prompt; nothing was measured")
        return out

    names = list(configs)
    print(f"\n{len(names)} configurations x {args.repeats} repeats, {args.steps} step(s) each, "
          f"{size}x{size} px (latent {latent}x{latent}), batch 2 (cond+uncond), fp32, "
          f"{torch.get_num_threads()} threads, SDPA; load avg {os.getloadavg()[0]:.2f}", flush=True)
    if args.warmup != "none":
        for name in tqdm(names if args.warmup == "all" else names[:1], desc="warm-up", file=sys.stdout, mininterval=0,
                         disable=not sys.stdout.isatty()):
            r = run(name)
            tqdm.write(f"  warm-up {name:13s} unet {r['unet']:7.2f} s  wall {r['wall']:7.2f} s", file=sys.stdout)
    results: dict[str, list[dict]] = defaultdict(list)
    bar = tqdm(total=len(names) * args.repeats, desc="measure", file=sys.stdout, mininterval=0,
               disable=not sys.stdout.isatty())
    for rep in range(args.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):     # alternate the order too
            r = run(name, track=args.memory == "inline")
            results[name].append(r)
            batches = sorted({c["batch"] for c in r["calls"]})
            tqdm.write(f"  rep {rep + 1} {name:13s} unet {r['unet']:7.2f} s  cpu {r['unet_cpu']:7.2f} s  "
                       f"wall {r['wall']:7.2f} s  load {r['load']:.2f}  "
                       f"calls {len(r['calls'])} batch {batches}  peak +{human(r['rss_peak'] - r['rss_before'])}",
                       file=sys.stdout)
            bar.update(1)
    bar.close()
    tensor_peaks: dict[str, int] = {}
    if args.memory != "rss":
        for name in names:
            rs = results[name] if args.memory == "inline" else [run(name, track=True)]
            tensor_peaks[name] = max(r["tensor_peak"] for r in rs)
            tqdm.write(f"  memory {name:13s} tensor high-water {human(tensor_peaks[name])}"
                       + (f" (untimed step, {rs[0]['unet']:.2f} s with the hook)" if args.memory == "separate" else ""),
                       file=sys.stdout)

    # ---------------------------------------------------------------- report
    def best(name: str, key: str) -> float:
        return min(r[key] for r in results[name])

    def per_step(name: str, key: str = "unet") -> float:
        return min(r[key] / max(len(r["calls"]), 1) for r in results[name])

    def attn_time(r: dict) -> float:
        steps = max(len(r["calls"]), 1)
        return (r["breakdown"].get("attention layers (whole forward)", 0.0)
                + r["breakdown"].get("MoA call state (wrapper)", 0.0)) / steps

    def in_step(name: str) -> float:
        """The step with the non-attention part of the UNet (identical work in every
        configuration) taken from the unpatched runs: all of MoA's work happens inside the
        attention layers and its wrapper, so this ratio does not depend on the machine speeding
        up or slowing down between steps."""
        base = results["unpatched"]
        rest = min(r["unet"] / max(len(r["calls"]), 1) - attn_time(r) for r in base)
        return (rest + min(attn_time(r) for r in results[name])) / (rest + min(attn_time(r) for r in base))

    def transient(name: str) -> int:
        return max(r["rss_peak"] - r["rss_before"] for r in results[name])

    def tensor_peak(name: str) -> int | None:
        return tensor_peaks.get(name)

    def mem_basis(name: str) -> int:      # what the overhead is computed from
        return tensor_peaks[name] if tensor_peaks else transient(name)

    base_cpu = per_step("unpatched", "unet_cpu")
    base_step, base_mem = per_step("unpatched"), mem_basis("unpatched")
    first = results["unpatched"][0]["calls"]
    print(f"\nUNet calls per step: {len(first) // args.steps}, batch sizes {[c['batch'] for c in first]}, "
          f"cond_or_uncond {first[0]['cond_or_uncond'] if first else None}")
    print("'in-step' = (unpatched non-attention time + this configuration's attention layers and MoA wrapper) / "
          "unpatched step (+ = meets the target, ! = misses): all of MoA's work is inside the attention layers, so "
          "this does not depend on the machine's speed drifting between steps, which on a shared machine moves "
          "the plain ratio by 10-20%")
    print("memory: 'tensors' = high-water mark of tensor bytes allocated during the step (exact); "
          "'+RSS' = peak RSS growth during the step after malloc_trim "
          f"({'VmHWM via clear_refs' if mem.exact else 'psutil sampled every 5 ms'}; glibc makes it noisy by "
          "tens of MiB); overhead = extra peak vs unpatched + adapter bytes (resident all along), from "
          f"{'tensors' if tensor_peaks else '+RSS (no tensor tracking: --memory rss)'}\n")
    hdr = (f"{'config':13s} {'s/step (UNet)':>13s} {'ratio':>6s} {'target':>7s} {'in-step':>7s} {'cpu s':>7s} {'cpu ratio':>9s} {'wall s':>7s} "
           f"{'+RSS':>10s} {'tensors':>10s} {'extra vs unp.':>13s} {'adapter':>10s} {'overhead/adapter':>16s} {'routed':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        step, ratio = per_step(name), per_step(name) / base_step
        kind, _, ex = name.partition("/")
        target = TARGETS.get(kind)
        tp = tensor_peak(name)
        rss = f"{human(transient(name)):>10s} {human(tp) if tp is not None else '-':>10s} "
        tr = mem_basis(name)
        routed = [r["routed"] for r in results[name] if r["routed"] is not None]
        if name == "unpatched":
            mem_cols = f"{rss}{'':>13s} {'':>10s} {'':>16s}"
        else:
            extra = tr - base_mem
            over = (extra + sizes[ex]) / sizes[ex]
            flag = "ok" if over <= TARGETS["memory"] else "MISS"
            mem_cols = f"{rss}{human(extra):>13s} {human(sizes[ex]):>10s} {over:>11.2f}x {flag:>4s}"
        tcol = f"<={target:.2f}" if target else ""
        flag = "" if not target else (" ok" if ratio <= target else " MISS")
        cpu = per_step(name, "unet_cpu")
        ist = in_step(name)
        iflag = "" if not target else ("+" if ist <= target else "!")
        print(f"{name:13s} {step:13.2f} {ratio:5.3f}x{flag:5s} {tcol:>6s} {ist:5.3f}x{iflag:1s} {cpu:7.2f} {cpu / base_cpu:8.3f}x "
              f"{best(name, 'wall'):7.2f} {mem_cols} "
              f"{(f'{100 * min(routed):.1f}%') if routed else '':>7s}")

    print("\nwhere the time goes (wall seconds per UNet step, from the repeat with the smallest UNet time; "
          "'cpu' ratios are process CPU time, less sensitive to other load on the machine):")
    keys = ["MoA call state (wrapper)", "attention layers (whole forward)", "prior attention kernel",
            "MoA hard_mix() (prior + expert)", "MoA mix() total", "  mix() attn1",
            "  mix() attn2", "  router MLP", "  expert projections", "    to_q", "    to_k", "    to_v", "    to_out",
            "  personal attention kernel"]
    print(f"{'':34s}" + "".join(f"{n:>14s}" for n in names))
    best_runs = {n: min(results[n], key=lambda r: r["unet"]) for n in names}
    for key in keys + ["  rest of mix() (index/mix/copy)", "rest of the UNet", "UNet total"]:
        row = []
        for n in names:
            r = best_runs[n]
            b, steps = r["breakdown"], max(len(r["calls"]), 1)
            if key == "  rest of mix() (index/mix/copy)":
                v = b.get("MoA mix() total", 0) - sum(b.get(k, 0) for k in
                                                      ("  router MLP", "  expert projections", "  personal attention kernel"))
            elif key == "rest of the UNet":
                v = r["unet"] - b.get("attention layers (whole forward)", 0)
            elif key == "UNet total":
                v = r["unet"]
            else:
                v = b.get(key, 0.0)
            row.append(f"{v / steps:14.3f}")
        print(f"{key:34s}" + "".join(row))
    import resource
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; process peak RSS "
          f"{human(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}; "
          f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
