"""The toy-world experiment: does the trainer learn MoA on a world where we know the answer?

    python -m experiments.toy_world.run --out runs/toy

1. a base UNet of the SD1.5 architecture trained on toy scenes (base.py), cached in
   runs/toy_base.safetensors and reused when its config matches;
2. a MoA adapter trained with the trainer's own loop (training.loop.train_adapter: the same
   modules, losses, checkpoints and log as `python -m moa_attention.train`) on many identities;
3. evaluation on identities the adapter never saw (and on seen ones): router share AUROC against
   the subject mask by timestep range, the change against the base model inside vs outside the
   subject (one UNet step and full 20-step DDIM sampling with the same seed), identity similarity
   of generated subjects to their reference, soft vs hard routing;
4. a table (stdout, results.json, table.md) and an image grid (grid.png): reference, base, MoA,
   router map, MoA with hard routing -- same seeds.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
from comfyui_moa.moa_attention.engine.adapter_file import load_adapter
from comfyui_moa.moa_attention.engine.call_state import STATE_KEY, CallState, MoASettings
from comfyui_moa.moa_attention.engine.layer import install_layers
from comfyui_moa.moa_attention.scoring.metrics import auroc, change_inside_outside, cosine
from comfyui_moa.moa_attention.training.capture import LossCapture, share_map
from comfyui_moa.moa_attention.training.config import TrainConfig
from comfyui_moa.moa_attention.training.loop import train_adapter
from comfyui_moa.moa_attention.training.step import MoATrainStep

from . import base as base_mod
from . import data, encoder, world

T_RANGES = ((100, 300), (300, 500), (500, 700), (700, 900))
#: DDIM clips its x0 estimate to the toy latents' range (|values| < 4; "clip denoised", as DDPM
#: samplers do for pixels): near t = 999 the x0 estimate multiplies a small base model's eps
#: error by 1/sqrt(a_t), and unclipped first steps can leave the whole sample noise
X0_CLAMP = 4.0
MAX_OBJECT_PIXELS = 80


@dataclass
class ToyConfig:
    seed: int = 0
    train_identities: int = 240          # 80 per class
    scenes_per_identity: int = 4
    eval_identities: int = 48            # unseen (own seed) and seen (from the training set)
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    expert: str = "lowrank"
    rank: int = 16
    sample_steps: int = 20
    cfg_scale: float = 3.0
    swap_t: int = 600                    # subject swap: regenerate a noised picture from this timestep
    loss: dict = field(default_factory=dict)     # TrainConfig loss options (CLI overrides)
    base: base_mod.BaseConfig = field(default_factory=base_mod.BaseConfig)


LOSS_OPTIONS = ("router_loss_weight", "router_loss_power", "subject_route_weight", "object_loss_weight",
                "subject_loss_weight", "background_effect_weight", "router_margin", "subject_x0_weight",
                "effect_x0_weight", "x0_weight_cap", "timestep_bias")


def get_base(cfg: ToyConfig, path: Path):
    if base_mod.cached_config(path) != cfg.base:
        print(f"training the base model ({cfg.base.steps} steps) into {path}", flush=True)
        base_mod.train_base(cfg.base, path)
    else:
        print(f"reusing the base model {path}", flush=True)
    return base_mod.load_base(path, "cpu")


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def ddim(unet, ac: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
         scale: float, fused: torch.Tensor | None = None, settings: MoASettings | None = None,
         start: torch.Tensor | None = None, start_t: int = 999):
    """Deterministic DDIM with classifier-free guidance; MoA (when `fused` is given) on the
    conditional rows only, as ComfyUI runs it. txt2img from pure noise, or (start, start_t) a
    picture noised to start_t and regenerated from there (SDEdit; MoA's subject swap).
    Returns (x0, router map averaged over steps or None)."""
    b = noise.shape[0]
    ts = torch.linspace(start_t, 0, steps).round().long()
    x = noise.clone() if start is None else ac[start_t].sqrt() * start + (1 - ac[start_t]).sqrt() * noise
    maps = []
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        opts = {}
        if fused is not None:
            capture = LossCapture([])
            opts = {STATE_KEY: CallState.whole_batch(fused, tuple(x.shape[-2:]), settings, observers=(capture,),
                                                     first_row=b)}
        eps = unet(torch.cat([x, x]), t.float().expand(2 * b), context=torch.cat([uncond, cond]),
                   transformer_options=opts).float()
        if fused is not None:
            maps.append(share_map(capture.layers, tuple(x.shape[-2:])))
        eu, ec = eps.chunk(2)
        e = eu + scale * (ec - eu)
        x0 = ((x - (1 - a_t).sqrt() * e) / a_t.sqrt()).clamp(-X0_CLAMP, X0_CLAMP)
        e = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x, (torch.stack(maps).mean(0) if maps else None)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class EvalSet:
    name: str
    identities: list
    examples: list          # one scene per identity (for the one-step numbers)
    refs: torch.Tensor      # [n, 10] reference descriptors
    features: torch.Tensor  # [n, 768]
    backgrounds: list


def eval_set(name: str, identities: list, seed: int) -> EvalSet:
    g = torch.Generator().manual_seed(seed)
    examples, refs, feats, bgs = [], [], [], []
    for ident in identities:
        lat, mask = data.reference(ident, g)
        d = encoder.descriptor(lat, mask)
        refs.append(d)
        feats.append(encoder.feature(lat, mask))
        scene = world.random_scene(g, ident)
        examples.append(data.example(scene, feats[-1]))
        bgs.append(scene.background)
    return EvalSet(name, identities, examples, torch.stack(refs), torch.stack(feats), bgs)


@torch.no_grad()
def one_step_numbers(step: MoATrainStep, es: EvalSet, seed: int) -> dict:
    """Share AUROC vs the mask per timestep range, and |eps_moa - eps_base| inside/outside."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    diffs, masks = [], []
    for lo, hi in T_RANGES:
        shares, labels = [], []
        for i in range(0, len(es.examples), 16):
            batch = es.examples[i:i + 16]
            noise = torch.randn((len(batch), *batch[0].latent.shape), generator=g)
            t = torch.randint(lo, hi, (len(batch),), generator=g)
            f = step.run(batch, noise, t, with_base=True)
            shares.append(share_map(f.captured, f.hw))
            labels.append(f.masks.amax(dim=1))
            diffs.append(f.pred - f.base)
            masks.append(f.masks.amax(dim=1))
        out[f"auroc_t{lo}_{hi}"] = auroc(torch.cat(shares), torch.cat(labels))
        s, m = torch.cat(shares), torch.cat(labels) > 0.5
        out[f"fg_share_t{lo}_{hi}"] = float(s[m].mean())
        out[f"bg_share_t{lo}_{hi}"] = float(s[~m].mean())
    d = torch.cat(diffs)
    out["step_change_in"], out["step_change_out"] = change_inside_outside(d, torch.zeros_like(d), torch.cat(masks))
    return out


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask.float()[:, None], 3, 1, 1)[:, 0]


def _similarity(latents: torch.Tensor, refs: torch.Tensor, bgs: list, centre: torch.Tensor) -> tuple[list, int]:
    sims, found = [], 0
    for lat, ref, bg in zip(latents, refs, bgs):
        mask = world.object_mask_from_latent(lat, bg)
        # an object covers 4..80 pixels (radius 2.5..4); more means the background itself is off
        d = encoder.descriptor(lat, mask.float()) if int(mask.sum()) <= MAX_OBJECT_PIXELS else None
        if d is None:
            sims.append(0.0)          # no object drawn: no similarity
            continue
        found += 1
        sims.append(cosine(d - centre, ref - centre))
    return sims, found


@torch.no_grad()
def sampling_numbers(unet, ac, es: EvalSet, cfg: ToyConfig, fusion, centre: torch.Tensor, seed: int,
                     start_t: int = 999) -> tuple[dict, dict]:
    """Full sampling with the same seed: base, MoA soft, MoA hard; change inside/outside the
    subject (the union of the objects drawn by base and MoA, dilated 1 px), identity similarity.
    start_t 999: txt2img; below: each scene's picture with *another* identity of the class in it
    (the subject of example i+3) is noised to start_t and regenerated (subject swap)."""
    from comfyui_moa.moa_attention.comfyui.subjects import fused_context
    g = torch.Generator().manual_seed(seed)
    n = len(es.examples)
    noise = torch.randn((n, world.CHANNELS, world.SIZE, world.SIZE), generator=g)
    cond = torch.stack([e.text for e in es.examples])
    uncond = world.embed(world.caption_tokens(None, None))[None].expand(n, -1, -1)
    fused = torch.stack([fused_context(fusion, e.text, e.positions, e.features) for e in es.examples])
    start = None
    if start_t < 999:
        other = [world.render(es.identities[(i + 3) % n], es.backgrounds[i], g) for i in range(n)]
        start = torch.stack([o.latent for o in other])
    kw = dict(start=start, start_t=start_t)
    base, _ = ddim(unet, ac, noise, cond, uncond, cfg.sample_steps, cfg.cfg_scale, **kw)
    soft, router = ddim(unet, ac, noise, cond, uncond, cfg.sample_steps, cfg.cfg_scale, fused, **kw)
    hard, _ = ddim(unet, ac, noise, cond, uncond, cfg.sample_steps, cfg.cfg_scale, fused, MoASettings(hard=True), **kw)
    obj = torch.stack([world.object_mask_from_latent(x, bg) | world.object_mask_from_latent(y, bg)
                       for x, y, bg in zip(base, soft, es.backgrounds)])
    subject = _dilate(obj)
    out = {}
    out["sample_change_in"], out["sample_change_out"] = change_inside_outside(soft, base, subject)
    out["hard_change_in"], out["hard_change_out"] = change_inside_outside(hard, base, subject)
    out["soft_vs_hard"] = float((soft - hard).abs().mean())
    out["soft_vs_hard_in"], out["soft_vs_hard_out"] = change_inside_outside(soft, hard, subject)
    s_moa, found_moa = _similarity(soft, es.refs, es.backgrounds, centre)
    s_hard, _ = _similarity(hard, es.refs, es.backgrounds, centre)
    s_base, found_base = _similarity(base, es.refs, es.backgrounds, centre)
    # mismatched: the same MoA outputs against another identity of the same class (classes cycle by 3)
    s_mis, _ = _similarity(soft, es.refs.roll(3, dims=0), es.backgrounds, centre)
    out.update(id_moa=sum(s_moa) / n, id_hard=sum(s_hard) / n, id_base=sum(s_base) / n, id_mismatched=sum(s_mis) / n,
               objects_found_moa=found_moa / n, objects_found_base=found_base / n)
    return out, {"base": base, "soft": soft, "hard": hard, "router": router, "start": start}


# ----------------------------------------------------------------------------- picture

def to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[4, H, W] toy latent -> [3, H, W] in [0, 1] through a fixed projection."""
    g = torch.Generator().manual_seed(world.WORLD_SEED + 4)
    proj, _ = torch.linalg.qr(torch.randn(world.CHANNELS, 3, generator=g))
    return (torch.einsum("chw,cd->dhw", latent, proj) * 0.3 + 0.5).clamp(0, 1)


def write_grid(path: Path, es: EvalSet, samples: dict, rows: int = 6, scale: int = 8) -> None:
    """Rows: identities. Columns: reference, [the picture regenerated, for a swap], base, MoA,
    router map (white = personalized, averaged over layers and steps), MoA with hard routing."""
    from PIL import Image
    tiles = []
    g = torch.Generator().manual_seed(7)
    for i in range(min(rows, len(es.examples))):
        ref_lat, _ = data.reference(es.identities[i], g)
        router = samples["router"][i].clamp(0, 1)[None].expand(3, -1, -1)
        row = [to_rgb(ref_lat)]
        if samples.get("start") is not None:
            row.append(to_rgb(samples["start"][i]))
        row += [to_rgb(samples["base"][i]), to_rgb(samples["soft"][i]), router, to_rgb(samples["hard"][i])]
        tiles.append(row)
    pad = 2
    cell = world.SIZE * scale
    cols = len(tiles[0])
    img = torch.ones(3, len(tiles) * (cell + pad) + pad, cols * (cell + pad) + pad)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            up = torch.nn.functional.interpolate(tile[None], scale_factor=scale, mode="nearest")[0]
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            img[:, y:y + cell, x:x + cell] = up
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path, optimize=True)


# ----------------------------------------------------------------------------- the run

def table(results: dict) -> str:
    one = ["| identities | " + " | ".join(f"share AUROC t {lo}-{hi}" for lo, hi in T_RANGES)
           + " | share in / out (t 300-500) | 1-step change in / out |", "|---" * 7 + "|"]
    for name in ("unseen", "seen"):
        r = results[name]
        one.append(f"| {name} | " + " | ".join(f"{r[f'auroc_t{lo}_{hi}']:.3f}" for lo, hi in T_RANGES)
                   + f" | {r['fg_share_t300_500']:.2f} / {r['bg_share_t300_500']:.2f}"
                   f" | {r['step_change_in']:.3f} / {r['step_change_out']:.3f} |")
    full = ["| identities, sampling | change in / out (out/in) | identity sim. MoA / hard / base / mismatched"
            " | objects drawn MoA / base | soft vs hard in / out |", "|---" * 5 + "|"]
    for name in ("unseen", "seen"):
        for label, p in (("txt2img", ""), (f"swap from t={results['config']['swap_t']}", "swap_")):
            r = {k[len(p):]: v for k, v in results[name].items() if k.startswith(p)} if p else results[name]
            ratio = r["sample_change_out"] / r["sample_change_in"] if r["sample_change_in"] else float("nan")
            full.append(f"| {name}, {label} | {r['sample_change_in']:.3f} / {r['sample_change_out']:.3f} ({ratio:.2f})"
                        f" | {r['id_moa']:.2f} / {r['id_hard']:.2f} / {r['id_base']:.2f} / {r['id_mismatched']:.2f}"
                        f" | {r['objects_found_moa']:.2f} / {r['objects_found_base']:.2f}"
                        f" | {r['soft_vs_hard_in']:.3f} / {r['soft_vs_hard_out']:.3f} |")
    return "\n".join(one) + "\n\n" + "\n".join(full)


def run(cfg: ToyConfig, out: Path, base_path: Path) -> dict:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model, _ = get_base(cfg, base_path)
    t_base = time.time() - t_start
    unet = model.diffusion_model
    ac = alphas_cumprod(model)
    train_ids = world.identities(cfg.train_identities, cfg.seed * 1000 + 1)
    unseen_ids = world.identities(cfg.eval_identities, cfg.seed * 1000 + 2)
    examples = data.make_examples(train_ids, cfg.scenes_per_identity, cfg.seed * 1000 + 3)
    unseen = eval_set("unseen", unseen_ids, cfg.seed * 1000 + 4)
    seen = eval_set("seen", train_ids[: cfg.eval_identities], cfg.seed * 1000 + 5)
    tc = TrainConfig(base=base_path, clip_vision=Path("toy-encoder"), data=Path("toy-world"),
                     output_dir=out / "adapter", expert=cfg.expert, rank=cfg.rank, resolution=world.SIZE * 8,
                     batch_size=cfg.batch_size, lr=cfg.lr, steps=cfg.steps, seed=cfg.seed, checkpoint_every=0,
                     log_every=10, eval_examples=len(unseen.examples), force=True, device="cpu", **cfg.loss)
    from comfyui_moa.moa_attention.training.loop import prepare_output
    prepare_output(tc, 0)
    t0 = time.time()
    if train_adapter(tc, unet, ac, examples, "cpu", eval_examples=unseen.examples) == 130:
        raise KeyboardInterrupt          # Ctrl-C: the adapter's checkpoint is kept, nothing to evaluate
    t_train = time.time() - t0

    adapter = load_adapter(tc.output_dir / "adapter.safetensors").eval().requires_grad_(False)
    install_layers(unet, adapter)
    step = MoATrainStep(adapter, unet, ac, tc)
    centre = torch.stack([encoder.descriptor(*data.reference(i, torch.Generator().manual_seed(k)))
                          for k, i in enumerate(train_ids)]).mean(0)
    results = {}
    for k, es in enumerate((unseen, seen)):
        r = one_step_numbers(step, es, cfg.seed * 1000 + 10 + k)
        s, samples = sampling_numbers(unet, ac, es, cfg, adapter.fusion, centre, cfg.seed * 1000 + 20 + k)
        w, swapped = sampling_numbers(unet, ac, es, cfg, adapter.fusion, centre, cfg.seed * 1000 + 30 + k,
                                      start_t=cfg.swap_t)
        results[es.name] = {**r, **s, **{f"swap_{key}": v for key, v in w.items()}}
        if es.name == "unseen":
            write_grid(out / "grid.png", es, samples)
            write_grid(out / "grid_swap.png", es, swapped)
    results["seconds"] = {"base": round(t_base, 1), "adapter": round(t_train, 1),
                          "total": round(time.time() - t_start, 1)}
    results["config"] = asdict(cfg)
    results["train_summary"] = json.loads((tc.output_dir / "summary.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"grid: {out / 'grid.png'}  (rows: unseen identities; columns: reference, base, MoA, router map, MoA hard)")
    print(f"seconds: {results['seconds']}")
    return results


def main(argv: list[str] | None = None) -> int:
    d = ToyConfig()
    td = TrainConfig(Path(), Path(), Path(), Path())
    p = argparse.ArgumentParser(prog="python -m experiments.toy_world.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/toy"))
    p.add_argument("--base-file", type=Path, default=Path("runs/toy_base.safetensors"),
                   help="cached base model (trained when missing or of another config)")
    for k, v in asdict(d).items():
        if k not in ("loss", "base"):
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    for k in LOSS_OPTIONS:
        p.add_argument(f"--{k.replace('_', '-')}", type=type(getattr(td, k)), default=getattr(td, k),
                       help="as the trainer's option of that name")
    p.add_argument("--base-steps", type=int, default=d.base.steps)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: all cores; use 1 when other jobs share the cores)")
    ns = vars(p.parse_args(argv))
    torch.set_num_threads(ns.pop("threads"))
    out, base_file = ns.pop("out"), ns.pop("base_file")
    base_cfg = base_mod.BaseConfig(steps=ns.pop("base_steps"))
    loss = {k: ns.pop(k) for k in LOSS_OPTIONS}
    cfg = ToyConfig(**ns, loss=loss, base=base_cfg)
    torch.manual_seed(cfg.seed)
    run(cfg, out, base_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
