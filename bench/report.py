"""The bench's tables, from the per-repeat results of bench_moa.run_step.

Headline: the PLAIN ratio, MoA's UNet seconds per step over the unpatched model's, paired
within each interleaved repeat; the median over repeats, with the min-max spread. Beside it,
labelled as corrected, the "in-step" ratio: the unpatched step's non-attention time plus this
configuration's attention layers and MoA wrapper, over the unpatched step. All of MoA's work
is inside those, and the rest of the UNet is identical work, so it is not moved by the
machine speeding up or slowing down between steps (other jobs, clock changes).
"""
from __future__ import annotations

import statistics

from memory import human

TARGETS = {"soft": 1.35, "sparse": 1.10, "hard": 1.15, "memory": 1.15}


def per_call(r: dict, seconds: float) -> float:
    return seconds / max(len(r["calls"]), 1)


def attention_time(r: dict) -> float:
    """Attention layers + MoA's wrapper, per UNet call: where all of MoA's work happens."""
    reg = r["regions"]
    return per_call(r, reg.layers + reg.moa_wrapper)


class Summary:
    """Per-configuration statistics over the interleaved repeats (repeat i of every
    configuration ran in the same round, next to each other)."""

    def __init__(self, results: dict[str, list[dict]]) -> None:
        self.results = results
        self.base = results["unpatched"]

    def steps(self, name: str, key: str = "unet") -> list[float]:
        return [per_call(r, r[key]) for r in self.results[name]]

    def step(self, name: str, key: str = "unet") -> float:
        return statistics.median(self.steps(name, key))

    def ratios(self, name: str, key: str = "unet") -> list[float]:
        return [a / b for a, b in zip(self.steps(name, key), self.steps("unpatched", key))]

    def in_step_ratios(self, name: str) -> list[float]:
        out = []
        for r, b in zip(self.results[name], self.base):
            rest = per_call(b, b["unet"]) - attention_time(b)
            out.append((rest + attention_time(r)) / (rest + attention_time(b)))
        return out

    def median_run(self, name: str) -> dict:
        runs = sorted(self.results[name], key=lambda r: r["unet"])
        return runs[(len(runs) - 1) // 2]

    def transient(self, name: str) -> int:
        return max(r["rss_peak"] - r["rss_before"] for r in self.results[name])


def print_intro(results: dict[str, list[dict]], steps: int, tensor_peaks: dict, rss_exact: bool) -> None:
    first = results["unpatched"][0]["calls"]
    print(f"\nUNet calls per step: {len(first) // steps}, batch sizes {[c['batch'] for c in first]}, "
          f"cond_or_uncond {first[0]['cond_or_uncond'] if first else None}")
    print("ratio = MoA UNet s/step / unpatched, paired within each interleaved repeat: the median, and "
          "[min-max] over repeats (ok / MISS vs the target).")
    print("corrected = 'in-step' ratio, drift-corrected: (unpatched non-attention time + this configuration's "
          "attention layers and MoA wrapper) / unpatched step, median over repeats (+ meets the target, "
          "! misses). All of MoA's work is inside the attention layers, so it is not moved by the machine's "
          "speed drifting between steps, which on a shared machine moves the plain ratio by 10-20%.")
    print("memory: 'tensors' = high-water mark of tensor bytes allocated during the step (exact); "
          "'+RSS' = peak RSS growth during the step after malloc_trim "
          f"({'VmHWM via clear_refs' if rss_exact else 'psutil sampled every 5 ms'}; glibc makes it noisy by "
          "tens of MiB); overhead = extra peak vs unpatched + adapter bytes (resident all along), from "
          f"{'tensors' if tensor_peaks else '+RSS (no tensor tracking: --memory rss)'}; "
          "routed = mean router share of the cond row (router maps)\n")


def print_table(results: dict[str, list[dict]], tensor_peaks: dict, adapter_sizes: dict) -> None:
    s = Summary(results)

    def mem_basis(name: str) -> int:
        return tensor_peaks[name] if tensor_peaks else s.transient(name)

    hdr = (f"{'config':14s} {'s/step':>7s} {'ratio':>6s} {'':5s} {'[min-max]':>13s} {'target':>7s} "
           f"{'corrected':>10s} {'cpu s':>7s} {'cpu ratio':>9s} {'wall s':>7s} {'+RSS':>10s} {'tensors':>10s} "
           f"{'extra vs unp.':>13s} {'adapter':>10s} {'overhead/adapter':>16s} {'routed':>7s}")
    print(hdr)
    print("-" * len(hdr))
    for name in results:
        kind, _, ex = name.partition("/")
        target = TARGETS.get(kind)
        ratios = s.ratios(name)
        ratio, ist = statistics.median(ratios), statistics.median(s.in_step_ratios(name))
        flag = "" if not target else ("ok" if ratio <= target else "MISS")
        iflag = "" if not target else ("+" if ist <= target else "!")
        tp = tensor_peaks.get(name)
        mem = f"{human(s.transient(name)):>10s} {human(tp) if tp is not None else '-':>10s} "
        if name == "unpatched":
            mem += f"{'':>13s} {'':>10s} {'':>16s}"
        else:
            extra = mem_basis(name) - mem_basis("unpatched")
            over = (extra + adapter_sizes[ex]) / adapter_sizes[ex]
            mem += (f"{human(extra):>13s} {human(adapter_sizes[ex]):>10s} {over:>11.2f}x "
                    f"{'ok' if over <= TARGETS['memory'] else 'MISS':>4s}")
        routed = [r["routed"] for r in results[name] if r["routed"] is not None]
        cpu_ratio = statistics.median(s.ratios(name, "unet_cpu"))
        print(f"{name:14s} {s.step(name):7.2f} {ratio:5.3f}x {flag:5s} "
              f"{f'[{min(ratios):.3f}-{max(ratios):.3f}]':>13s} {f'<={target:.2f}' if target else '':>7s} "
              f"{ist:9.3f}x{iflag:1s}{s.step(name, 'unet_cpu'):7.2f} {cpu_ratio:8.3f}x "
              f"{statistics.median(r['wall'] for r in results[name]):7.2f} {mem} "
              f"{f'{100 * statistics.median(routed):.1f}%' if routed else '':>7s}")


BREAKDOWN = [      # (row, seconds of a run's Regions over its UNet calls, given the run's UNet seconds)
    ("MoA wrapper (call state)", lambda g, u: g.moa_wrapper),
    ("attention layers (whole forward)", lambda g, u: g.layers),
    ("  prior attention kernel", lambda g, u: g.prior_kernel),
    ("  MoA router", lambda g, u: g.router),
    ("  MoA expert (proj. + personal attn)", lambda g, u: g.expert),
    ("    personal attention kernel", lambda g, u: g.personal_kernel),
    ("    expert projections", lambda g, u: g.expert - g.personal_kernel),
    ("  MoA mix", lambda g, u: g.mix),
    ("  rest (prior proj., indexing)", lambda g, u: g.layers - g.prior_kernel - g.router - g.expert - g.mix),
    ("rest of the UNet", lambda g, u: u - g.layers - g.moa_wrapper),
    ("UNet total (APPLY_MODEL)", lambda g, u: u),
]


def print_breakdown(results: dict[str, list[dict]]) -> None:
    s = Summary(results)
    names = list(results)
    runs = {n: s.median_run(n) for n in names}
    print("\nwhere the time goes (wall seconds per UNet call, from each configuration's median repeat; profiler "
          "regions: moa.router / moa.expert / moa.mix inside the MoA layers, the attention kernel through "
          "ComfyUI's attention override):")
    print(f"{'':38s}" + "".join(f"{n:>16s}" for n in names))
    for row, value in BREAKDOWN:
        print(f"{row:38s}" + "".join(f"{per_call(runs[n], value(runs[n]['regions'], runs[n]['unet'])):16.3f}"
                                     for n in names))
    base = per_call(runs["unpatched"], runs["unpatched"]["unet"])
    print(f"{'MoA extra vs unpatched':38s}" + "".join(f"{per_call(runs[n], runs[n]['unet']) - base:16.3f}"
                                                      for n in names))
