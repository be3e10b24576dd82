"""The toy-world experiment: does the trainer learn MoA on a world where we know the answer?

    python -m experiments.toy_world.run --out runs/toy

1. a base UNet of the SD1.5 architecture trained on toy scenes (base.py), cached in
   runs/toy_base.safetensors and reused when its config matches;
2. a MoA adapter trained with the trainer's own loop (training.loop.train_adapter: the same
   modules, losses, checkpoints and log as `python -m moa_attention.train`) on many identities;
3. evaluation on identities the adapter never saw (and on seen ones): router share AUROC against
   the subject mask by timestep range and the one-step change inside vs outside the subject;
   then, through the pack's ComfyUI path (comfy_eval.py: apply_moa, comfy.sample, the pack's
   DDIM inversion for the swap), identity retrieval among the class's references, the context
   change inside vs outside the subject, soft vs hard routing;
4. a table (stdout, results.json, table.md) and image grids (grid.png, grid_swap.png): reference,
   [photo,] base, MoA, router map, MoA with hard routing -- same seeds;
5. with several adapter seeds (one cached base), each seed in its own folder and a summary of the
   headline numbers with their spread (summary.md, summary.json).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
from comfyui_moa.moa_attention.engine.adapter_file import load_adapter
from comfyui_moa.moa_attention.engine.layer import install_layers
from comfyui_moa.moa_attention.scoring.metrics import auroc, change_inside_outside
from comfyui_moa.moa_attention.training.capture import share_map
from comfyui_moa.moa_attention.training.config import TrainConfig
from comfyui_moa.moa_attention.training.loop import train_adapter
from comfyui_moa.moa_attention.training.step import MoATrainStep

from . import base as base_mod
from . import comfy_eval, data, encoder, world

T_RANGES = ((100, 300), (300, 500), (500, 700), (700, 900))


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
    identity_tokens: int = 1             # fused tokens per subject (the trainer's --identity-tokens)
    prompt_schedule: bool = False        # the trainer's --prompt-schedule
    sample_steps: int = 20               # txt2img: KSampler's steps, cfg, sampler and scheduler
    cfg_scale: float = 3.0
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    swap_steps: int = 20                 # swap: MoA Invert Photo's steps and refine (at cfg 1)
    swap_refine: int = 3
    swap_cfg: float = 1.0                # swap: KSamplerAdvanced's cfg regenerating from the inverted noise
    strength: float = 1.0                # MoA Apply's strength when sampling (txt2img and swap)
    start_percent: float = 0.0           # MoA Apply's start_percent when sampling (txt2img and swap)
    swap_renoise: float = 0.0            # MoA Invert Photo's renoise in the old subject's region
    sparse_threshold: float = 0.0        # MoA Apply's sparse_threshold when sampling (0 = dense soft)
    loss: dict = field(default_factory=dict)     # TrainConfig loss options (CLI overrides)
    base: base_mod.BaseConfig = field(default_factory=base_mod.BaseConfig)


LOSS_OPTIONS = ("router_loss_weight", "router_loss_power", "subject_route_weight", "object_loss_weight",
                "subject_loss_weight", "background_effect_weight", "router_margin", "subject_x0_weight",
                "effect_x0_weight", "mask_routed_weight", "x0_weight_cap", "timestep_bias",
                "recolour_t", "lr_schedule")


def get_base(cfg: ToyConfig, path: Path):
    if base_mod.cached_config(path) != cfg.base:
        print(f"training the base model ({cfg.base.steps} steps) into {path}", flush=True)
        base_mod.train_base(cfg.base, path)
    else:
        print(f"reusing the base model {path}", flush=True)
    return base_mod.load_base(path, "cpu")


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


#: one-step identity: the noise levels where a picture's colours are decided (t >= 600)
IDENTITY_TS = (600, 800, 950)


@torch.no_grad()
def one_step_x0(step: MoATrainStep, es: EvalSet, t: int, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The x0 estimates of MoA and the base after one UNet step from each scene noised to t."""
    f = step.run(es.examples, noise, torch.full((len(es.examples),), t), with_base=True)
    a = step.alphas_cumprod[t]
    x0 = torch.stack([e.latent for e in es.examples])
    return {name: x0 + ((1 - a) / a).sqrt() * (noise - eps) for name, eps in (("moa", f.pred), ("base", f.base))}


@torch.no_grad()
def one_step_identity(step: MoATrainStep, es: EvalSet, centre: torch.Tensor, seed: int,
                      ts: tuple[int, ...] = IDENTITY_TS) -> dict:
    """Each scene noised to t, one UNet step with and without MoA: is the subject's identity in
    the x0 estimate inside the scene's own mask? Top-1 retrieval among the class's references, for
    MoA and the base (which only has what the noisy picture still shows)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.stack([e.masks[0] for e in es.examples])
    classes = [i.cls for i in es.identities]
    own = list(range(len(es.examples)))
    out = {}
    for t in ts:
        noise = torch.randn((len(es.examples), *es.examples[0].latent.shape), generator=g)
        for name, est in one_step_x0(step, es, t, noise).items():
            top1 = [comfy_eval.rank_in_class(encoder.descriptor(x, m), es.refs, classes, i, centre) == 1
                    for i, (x, m) in zip(own, zip(est, masks))]
            out[f"x0_top1_{name}_t{t}"] = sum(top1) / len(top1)
    return out


def sample_spec(cfg: ToyConfig) -> comfy_eval.SampleSpec:
    """How the run's pictures are sampled (txt2img and swap), from its options."""
    return comfy_eval.SampleSpec(steps=cfg.sample_steps, cfg=cfg.cfg_scale, sampler=cfg.sampler,
                                 scheduler=cfg.scheduler, swap_steps=cfg.swap_steps, swap_refine=cfg.swap_refine,
                                 swap_cfg=cfg.swap_cfg, strength=cfg.strength, start_percent=cfg.start_percent,
                                 swap_renoise=cfg.swap_renoise, sparse_threshold=cfg.sparse_threshold)


def judged(es: EvalSet) -> comfy_eval.Judged:
    return comfy_eval.Judged(es.examples, list(es.features), es.refs, [i.cls for i in es.identities], es.backgrounds)


def swap_photos(es: EvalSet, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Photo i: another identity of picture i's class (the one three places on; classes cycle by
    three) on picture i's background. (latents, masks, the old identity of each photo)"""
    g = torch.Generator().manual_seed(seed)
    n = len(es.examples)
    old = [(i + 3) % n for i in range(n)]
    scenes = [world.render(es.identities[o], es.backgrounds[i], g) for i, o in enumerate(old)]
    return torch.stack([s.latent for s in scenes]), torch.stack([s.mask for s in scenes]), old


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

def _ratio(r: dict, prefix: str = "") -> str:
    return f"{r[prefix + 'change_in']:.3f} / {r[prefix + 'change_out']:.3f} ({r[prefix + 'context_ratio']:.2f})"


def table(results: dict) -> str:
    one = ["| identities | " + " | ".join(f"share AUROC t {lo}-{hi}" for lo, hi in T_RANGES)
           + " | share in / out (t 300-500) | 1-step change in / out |", "|---" * 7 + "|"]
    for name in ("unseen", "seen"):
        r = results[name]
        one.append(f"| {name} | " + " | ".join(f"{r[f'auroc_t{lo}_{hi}']:.3f}" for lo, hi in T_RANGES)
                   + f" | {r['fg_share_t300_500']:.2f} / {r['bg_share_t300_500']:.2f}"
                   f" | {r['step_change_in']:.3f} / {r['step_change_out']:.3f} |")
    x0 = ["| identities, one step | " + " | ".join(f"x0 identity top-1 t={t} MoA / base" for t in IDENTITY_TS) + " |",
          "|---" * (1 + len(IDENTITY_TS)) + "|"]
    for name in ("unseen", "seen"):
        r = results[name]
        x0.append(f"| {name} | " + " | ".join(f"{r[f'x0_top1_moa_t{t}']:.2f} / {r[f'x0_top1_base_t{t}']:.2f}"
                                             for t in IDENTITY_TS) + " |")
    t2i = ["| identities, txt2img | identity top-1 MoA / hard / base | mean rank MoA / base | centred cosine MoA / base"
           " | change in / out (out/in) | soft vs hard in / out |", "|---" * 6 + "|"]
    for name in ("unseen", "seen"):
        r = results[name]
        t2i.append(f"| {name} | {r['soft_top1']:.2f} / {r['hard_top1']:.2f} / {r['base_top1']:.2f}"
                   f" | {r['soft_mean_rank']:.1f} / {r['base_mean_rank']:.1f} | {r['soft_cosine']:.2f} / {r['base_cosine']:.2f}"
                   f" | {_ratio(r)} | {r['soft_vs_hard_in']:.3f} / {r['soft_vs_hard_out']:.3f} |")
    r = results["unseen"]
    swap = ["| unseen, swap | new identity top-1 MoA / hard / base | old identity top-1 MoA / hard / base"
            " | change in / out the old object's region (out/in) | base reconstruction error |", "|---" * 5 + "|",
            f"| inverted, regenerated | {r['swap_soft_new_top1']:.2f} / {r['swap_hard_new_top1']:.2f} /"
            f" {r['swap_base_new_top1']:.2f} | {r['swap_soft_old_top1']:.2f} / {r['swap_hard_old_top1']:.2f} /"
            f" {r['swap_base_old_top1']:.2f} | {_ratio(r, 'swap_')} | {r['swap_base_reconstruction_error']:.3f} |"]
    return "\n".join(one) + "\n\n" + "\n".join(x0) + "\n\n" + "\n".join(t2i) + "\n\n" + "\n".join(swap)


def train_config(cfg: ToyConfig, base_path: Path, adapter_dir: Path, eval_examples: int) -> TrainConfig:
    return TrainConfig(base=base_path, clip_vision=Path("toy-encoder"), data=Path("toy-world"),
                       output_dir=adapter_dir, expert=cfg.expert, rank=cfg.rank, resolution=world.SIZE * 8,
                       identity_tokens=cfg.identity_tokens, prompt_schedule=cfg.prompt_schedule,
                       batch_size=cfg.batch_size, lr=cfg.lr, steps=cfg.steps, seed=cfg.seed, checkpoint_every=0,
                       log_every=10, eval_examples=eval_examples, force=True, device="cpu", **cfg.loss)


def train(cfg: ToyConfig, out: Path, base_path: Path, unet, ac, examples: list, unseen: EvalSet) -> TrainConfig:
    """The adapter, trained by the trainer's own loop into out/adapter."""
    from comfyui_moa.moa_attention.training.loop import prepare_output
    tc = train_config(cfg, base_path, out / "adapter", len(unseen.examples))
    prepare_output(tc, 0)
    if train_adapter(tc, unet, ac, examples, "cpu", eval_examples=unseen.examples) == 130:
        raise KeyboardInterrupt          # Ctrl-C: the adapter's checkpoint is kept, nothing to evaluate
    return tc


def evaluate(cfg: ToyConfig, out: Path, model, tc: TrainConfig, train_ids: list, sets: list[EvalSet]) -> dict:
    """One-step numbers on the bare UNet, then pictures through ComfyUI; grids of the unseen set."""
    unet, ac = model.diffusion_model, alphas_cumprod(model)
    adapter = load_adapter(tc.output_dir / "adapter.safetensors").eval().requires_grad_(False)
    centre = torch.stack([encoder.descriptor(*data.reference(i, torch.Generator().manual_seed(k)))
                          for k, i in enumerate(train_ids)]).mean(0)
    uninstall = install_layers(unet, adapter)
    step = MoATrainStep(adapter, unet, ac, tc)
    results = {es.name: {**one_step_numbers(step, es, cfg.seed * 1000 + 10 + k),
                         **one_step_identity(step, es, centre, cfg.seed * 1000 + 15 + k)} for k, es in enumerate(sets)}
    uninstall()
    patcher, loaded = comfy_eval.comfy_model(model), LoadedAdapter(adapter, "toy")
    spec = sample_spec(cfg)
    for k, es in enumerate(sets):
        s, pictures = comfy_eval.txt2img_numbers(patcher, loaded, judged(es), centre, spec, cfg.seed * 1000 + 20 + k)
        results[es.name].update(s)
        if es.name == "unseen":
            photos, masks, old = swap_photos(es, cfg.seed * 1000 + 30)
            w, swapped = comfy_eval.swap_numbers(patcher, loaded, judged(es), photos, masks, old, centre, spec)
            results[es.name].update({f"swap_{key}": v for key, v in w.items()})
            write_grid(out / "grid.png", es, pictures)
            write_grid(out / "grid_swap.png", es, swapped)
    return results


def run(cfg: ToyConfig, out: Path, base_path: Path, adapter_dir: Path | None = None) -> dict:
    """Train (or, given `adapter_dir`, a finished run's adapter folder, reuse) and evaluate."""
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model, _ = get_base(cfg, base_path)
    t_base = time.time() - t_start
    train_ids = world.identities(cfg.train_identities, cfg.seed * 1000 + 1)
    unseen_ids = world.identities(cfg.eval_identities, cfg.seed * 1000 + 2)
    examples = data.make_examples(train_ids, cfg.scenes_per_identity, cfg.seed * 1000 + 3)
    unseen = eval_set("unseen", unseen_ids, cfg.seed * 1000 + 4)
    seen = eval_set("seen", train_ids[: cfg.eval_identities], cfg.seed * 1000 + 5)
    t0 = time.time()
    if adapter_dir is None:
        tc = train(cfg, out, base_path, model.diffusion_model, alphas_cumprod(model), examples, unseen)
    else:
        tc = train_config(cfg, base_path, adapter_dir, len(unseen.examples))
    t_train = time.time() - t0
    results = evaluate(cfg, out, model, tc, train_ids, [unseen, seen])
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


#: (label, key in results["unseen"], target) of the numbers summarised over adapter seeds
HEADLINE = (("txt2img identity top-1, MoA", "soft_top1", ">= 0.8"), ("txt2img identity top-1, hard", "hard_top1", ""),
            ("txt2img identity top-1, base", "base_top1", "near 1/16"),
            ("txt2img mean rank, MoA", "soft_mean_rank", ""),
            ("txt2img context out/in", "context_ratio", "<= 0.2"),
            ("share AUROC t 100-300", "auroc_t100_300", ">= 0.9"), ("share AUROC t 300-500", "auroc_t300_500", ">= 0.9"),
            ("share AUROC t 500-700", "auroc_t500_700", ">= 0.9"),
            ("swap new identity top-1, MoA", "swap_soft_new_top1", ">= 0.6"),
            ("swap old identity top-1, MoA", "swap_soft_old_top1", "<= 0.2"),
            ("swap context out/in", "swap_context_ratio", "<= 0.2"))


def summary(per_seed: dict[int, dict]) -> tuple[str, dict]:
    """Mean and standard deviation over adapter seeds of the headline numbers (unseen identities)."""
    seeds = sorted(per_seed)
    rows = ["| unseen identities | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | target |",
            "|---" * (len(seeds) + 3) + "|"]
    out = {}
    for label, key, target in HEADLINE + (("top-1 soft - hard", None, "within 0.1"),):
        vals = [r["unseen"][key] if key else r["unseen"]["soft_top1"] - r["unseen"]["hard_top1"]
                for r in (per_seed[s] for s in seeds)]
        t = torch.tensor(vals, dtype=torch.float64)
        mean, std = float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0
        out[key or "soft_minus_hard_top1"] = {"values": vals, "mean": mean, "std": std}
        rows.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {mean:.2f} ± {std:.2f} | {target} |")
    return "\n".join(rows), out


def main(argv: list[str] | None = None) -> int:
    d = ToyConfig()
    td = TrainConfig(Path(), Path(), Path(), Path())
    p = argparse.ArgumentParser(prog="python -m experiments.toy_world.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/toy"))
    p.add_argument("--base-file", type=Path, default=Path("runs/toy_base.safetensors"),
                   help="cached base model (trained when missing or of another config)")
    for k, v in asdict(d).items():
        if isinstance(v, bool):
            p.add_argument(f"--{k.replace('_', '-')}", action="store_true")
        elif k not in ("loss", "base"):
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    for k in LOSS_OPTIONS:
        p.add_argument(f"--{k.replace('_', '-')}", type=type(getattr(td, k)), default=getattr(td, k),
                       help="as the trainer's option of that name")
    p.add_argument("--adapter-seeds", type=int, default=1,
                   help="adapters trained (seeds --seed, --seed + 1, ...) on the one cached base, each in out/seed<N>, "
                        "and their headline numbers summarised with the spread (summary.md)")
    p.add_argument("--adapter-dir", type=Path, default=None,
                   help="evaluate the adapter of a finished run (its out/adapter folder) instead of training one; "
                        "the run's other options must match it")
    p.add_argument("--base-steps", type=int, default=d.base.steps)
    p.add_argument("--base-channels", type=int, default=d.base.model_channels,
                   help="the base UNet's model_channels (32: 1.6M parameters; 64: 5.2M)")
    p.add_argument("--base-low-freq-min-t", type=int, default=d.base.low_freq_min_t,
                   help="the base's block (offset) noise only at timesteps >= this; plain noise below")
    p.add_argument("--base-norm-groups", type=int, default=d.base.norm_groups,
                   help="GroupNorm groups in the base UNet (ComfyUI's default 32 is one channel each at 32 channels)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: all cores; use 1 when other jobs share the cores)")
    ns = vars(p.parse_args(argv))
    torch.set_num_threads(ns.pop("threads"))
    out, base_file, n_seeds = ns.pop("out"), ns.pop("base_file"), ns.pop("adapter_seeds")
    adapter_dir = ns.pop("adapter_dir")
    if adapter_dir is not None and n_seeds > 1:
        p.error("--adapter-dir evaluates one adapter: drop --adapter-seeds")
    base_cfg = base_mod.BaseConfig(steps=ns.pop("base_steps"), model_channels=ns.pop("base_channels"),
                                   low_freq_min_t=ns.pop("base_low_freq_min_t"), norm_groups=ns.pop("base_norm_groups"))
    loss = {k: ns.pop(k) for k in LOSS_OPTIONS}
    cfg = ToyConfig(**ns, loss=loss, base=base_cfg)
    if n_seeds <= 1:
        torch.manual_seed(cfg.seed)
        run(cfg, out, base_file, adapter_dir)
        return 0
    per_seed = {}
    for seed in range(cfg.seed, cfg.seed + n_seeds):
        torch.manual_seed(seed)
        per_seed[seed] = run(replace(cfg, seed=seed), out / f"seed{seed}", base_file)
    text, numbers = summary(per_seed)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(numbers, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
