"""Which part of a drawn subject keeps a trained adapter's txt2img pictures from their own
reference: the colours, the pattern or the object's rim?

    python -m experiments.toy_world.diagnose --adapter-dir runs/toy/adapter --out runs/toy/diagnosis.json

The unseen identities, noise and sampling of run.py's txt2img for the same --seed (with the
given sampler, scheduler, cfg, strength and start_percent). Each MoA picture's descriptor is
ranked among its class's references as the judge does, then with the reference's 2 pattern
numbers in place of the drawn ones, with the reference's 8 colour numbers in place of the drawn
ones, and on the drawn object's mask eroded by 1 px. The colour pair's miss is split in two: its
midpoint (the object's hue on average) and the axis along which it splits into two colours (the
same numbers for the base's pictures beside them). A diagnosis, not a judge: the oracles say which
part to fix.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
from comfyui_moa.moa_attention.engine.adapter_file import load_adapter
from comfyui_moa.moa_attention.engine.layer import install_layers
from comfyui_moa.moa_attention.training.step import MoATrainStep

from . import base as base_mod
from . import comfy_eval, data, encoder, world
from .run import EvalSet, ToyConfig, eval_set, get_base, judged, one_step_x0, sample_spec, train_config

COLOURS = slice(0, 8)          # the descriptor's two colour clusters; the last 2 numbers: the pattern
SPLIT = ("midpoint_error", "split_ratio", "split_alignment")
TOP1 = ("as_judged", "right_pattern", "right_colours", "eroded_core")
SPLIT_TS = (200, 400, 600, 800, 950)


def eroded(mask: torch.Tensor) -> torch.Tensor:
    """[H, W] mask minus its rim (pixels with a neighbour outside it)."""
    return -torch.nn.functional.max_pool2d(-mask.float()[None, None], 3, 1, 1)[0, 0]


def _rank(d: torch.Tensor | None, js: comfy_eval.Judged, i: int, centre: torch.Tensor) -> int:
    return comfy_eval.rank_in_class(d, js.refs, js.classes, i, centre)


def colour_pairs(identities: list) -> torch.Tensor:
    """[n, 2, 4] each identity's two colours."""
    return torch.tensor([[i.colour_a, i.colour_b] for i in identities])


def colour_split(d: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How a descriptor's colour pair misses the identity's two colours `true` [2, 4]: its
    midpoint (the hue on average) and its split (the two colours apart, as far as and along the
    true two; |cos| of random directions in 4-d averages 0.42)."""
    drawn = d[COLOURS].view(2, -1)
    gap_d, gap_t = drawn[1] - drawn[0], true[1] - true[0]
    return {"midpoint_error": float((drawn.mean(0) - true.mean(0)).norm()),
            "split_ratio": float(gap_d.norm() / gap_t.norm().clamp_min(1e-6)),
            "split_alignment": float(torch.nn.functional.cosine_similarity(gap_d, gap_t, dim=0).abs())}


def picture_parts(latent: torch.Tensor, background: str, js: comfy_eval.Judged, i: int,
                  centre: torch.Tensor, pair: torch.Tensor) -> dict[str, float] | None:
    """Top-1 of picture i as judged and with each oracle; its colour error, colour split and object
    size."""
    d = comfy_eval.drawn_descriptor(latent, background)
    if d is None:
        return None
    ref = js.refs[i]
    right_pattern, right_colours = d.clone(), d.clone()
    right_pattern[COLOURS.stop:] = ref[COLOURS.stop:]
    right_colours[COLOURS] = ref[COLOURS]
    mask = world.object_mask_from_latent(latent, background)
    core = eroded(mask)
    d_core = encoder.descriptor(latent, core) if core.sum() >= 4 else None
    return {"as_judged": float(_rank(d, js, i, centre) == 1),
            "right_pattern": float(_rank(right_pattern, js, i, centre) == 1),
            "right_colours": float(_rank(right_colours, js, i, centre) == 1),
            "eroded_core": float(_rank(d_core, js, i, centre) == 1),
            "colour_error": float((d[COLOURS] - ref[COLOURS]).norm()),
            "object_pixels": float(mask.sum()), **colour_split(d, pair)}


def diagnose(cfg: ToyConfig, base_file: Path, adapter_dir: Path) -> dict[str, float]:
    """Mean of picture_parts over the unseen set (a picture without an object counts 0 top-1)."""
    model, _ = get_base(cfg, base_file)
    train_ids = world.identities(cfg.train_identities, cfg.seed * 1000 + 1)
    unseen = eval_set("unseen", world.identities(cfg.eval_identities, cfg.seed * 1000 + 2), cfg.seed * 1000 + 4)
    centre = torch.stack([encoder.descriptor(*data.reference(i, torch.Generator().manual_seed(k)))
                          for k, i in enumerate(train_ids)]).mean(0)
    adapter = load_adapter(adapter_dir / "adapter.safetensors").eval().requires_grad_(False)
    uninstall = install_layers(model.diffusion_model, adapter)
    tc = train_config(cfg, base_file, adapter_dir, len(unseen.examples))
    one_step = one_step_split(MoATrainStep(adapter, model.diffusion_model, alphas_cumprod(model), tc), unseen,
                              cfg.seed * 1000 + 25)
    uninstall()
    spec = sample_spec(cfg)
    js = judged(unseen)
    _, pictures = comfy_eval.txt2img_numbers(comfy_eval.comfy_model(model), LoadedAdapter(adapter, "toy"), js,
                                             centre, spec, cfg.seed * 1000 + 20)
    pairs = colour_pairs(unseen.identities)
    out, base = ([picture_parts(x, js.backgrounds[i], js, i, centre, pairs[i]) for i, x in enumerate(latents)]
                 for latents in (pictures["soft"], pictures["base"]))
    out, base = _means(out), _means(base)
    out.update({f"base_{k}": base[k] for k in ("colour_error", "object_pixels", "found", *SPLIT)})
    out["true_object_pixels"] = sum(float(e.masks[0].sum()) for e in unseen.examples) / len(unseen.examples)
    return {**out, **one_step}


def posterior_mean(noisy: torch.Tensor, pairs: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """[n, 4, H, W] each pixel's expected x0 if it is one of its scene's two colours (pairs
    [n, 2, 4]): what a denoiser that knows the identity, but not the pattern's phase, estimates."""
    a, b = pairs[:, 0, :, None, None], pairs[:, 1, :, None, None]
    dist = [((noisy - abar.sqrt() * c) ** 2).sum(1) for c in (a, b)]
    w = torch.sigmoid((dist[1] - dist[0]) / (2 * (1 - abar)))[:, None]
    return w * a + (1 - w) * b


@torch.no_grad()
def one_step_split(step: MoATrainStep, es: EvalSet, seed: int, ts: tuple[int, ...] = SPLIT_TS) -> dict[str, float]:
    """Each scene noised to t, one step: the colour pair of the x0 estimate inside the scene's
    mask against the identity's two colours (midpoint error, split alignment), for MoA, the base,
    the posterior mean of a denoiser that knows the two colours and the noisy input itself
    (x_t / sqrt(abar): a denoiser that removes nothing, which a good one should beat)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.stack([e.masks[0] for e in es.examples])
    x0 = torch.stack([e.latent for e in es.examples])
    pairs = colour_pairs(es.identities)
    out = {}
    for t in ts:
        noise = torch.randn(x0.shape, generator=g)
        ests = one_step_x0(step, es, t, noise)
        a = step.alphas_cumprod[t]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ests["oracle"], ests["input"] = posterior_mean(noisy, pairs, a), noisy / a.sqrt()
        for name, est in ests.items():
            parts = [colour_split(encoder.descriptor(x, m), pair) for x, m, pair in zip(est, masks, pairs)]
            for k in ("midpoint_error", "split_alignment"):
                out[f"x0_{k}_{name}_t{t}"] = sum(p[k] for p in parts) / len(parts)
    return out


def _means(parts: list[dict | None]) -> dict[str, float]:
    """Top-1s over all pictures (one without an object counts 0), the rest over those found."""
    found = [p for p in parts if p is not None]
    out = {k: sum(p[k] for p in found) / len(parts) for k in TOP1}
    out.update({k: sum(p[k] for p in found) / max(len(found), 1) for k in ("colour_error", "object_pixels", *SPLIT)})
    out["found"] = len(found) / len(parts)
    return out


def main(argv: list[str] | None = None) -> int:
    d = ToyConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.toy_world.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter-dir", type=Path, required=True, help="a run's adapter folder (out/adapter)")
    p.add_argument("--base-file", type=Path, default=Path("runs/toy_base.safetensors"),
                   help="the base the adapter was trained on (its config is read from the file)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON too")
    for k in ("seed", "train_identities", "eval_identities", "sample_steps", "cfg_scale", "sampler",
              "scheduler", "strength", "start_percent"):
        p.add_argument(f"--{k.replace('_', '-')}", type=type(getattr(d, k)), default=getattr(d, k))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    ns = vars(p.parse_args(argv))
    torch.set_num_threads(ns.pop("threads"))
    adapter_dir, base_file, out = ns.pop("adapter_dir"), ns.pop("base_file"), ns.pop("out")
    base_cfg = base_mod.cached_config(base_file)
    if base_cfg is None:
        p.error(f"--base-file {base_file}: no base model there; diagnose the adapter with the base it was trained on")
    numbers = diagnose(ToyConfig(**ns, base=base_cfg), base_file, adapter_dir)
    text = json.dumps(numbers, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
