"""The toy world's base model: a small UNet of the SD1.5 architecture (ComfyUI's own SD15 /
UNetModel classes, context 768, eps prediction, SD1.5's noise schedule), trained from scratch
on toy scenes so the frozen prior is competent on context before any adapter is trained.

`python -m experiments.toy_world.base --out runs/toy_base.safetensors` trains and caches it;
the run script reuses the file when its config matches.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from comfyui_moa.moa_attention.comfyui.bootstrap import start_comfyui
from comfyui_moa.moa_attention.comfyui.models import COMFYUI_NORM_GROUPS
from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod

from . import world


@dataclass
class BaseConfig:
    model_channels: int = 32
    levels: int = 2
    middle: bool = True
    # the better the base knows its scenes, the less an adapter's subject changes the context;
    # no gain beyond 2,000 steps (README.md, "What sets the context ratio")
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    ema: float = 0.995               # decay of an exponential moving average of the weights (0: off)
    x0_weight_cap: float = 20.0      # weight max(1, min((1 - abar) / abar, cap)): x0 units at high noise
    low_freq_noise: float = 0.3      # multi-scale noise weight (offset noise at 1x1, 2x2 and 4x4 blocks)
    # plain noise below this timestep: where the picture shows through, block noise only teaches
    # the base to distrust an object's mean colour, which the sampler's plain noise never shifts
    low_freq_min_t: int = 500
    # GroupNorm groups (ComfyUI builds 32): at 32 channels 32 groups are an instance norm per channel;
    # 4 groups keep about SD1.5's channels per group (README.md, "A base with SD1.5's normalisation")
    norm_groups: int = 4
    seed: int = 0


def unet_config(cfg: BaseConfig) -> dict:
    mult = [1, 2, 4, 4][: cfg.levels]
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": cfg.model_channels,
            "num_res_blocks": [1] * cfg.levels, "transformer_depth": [1] * cfg.levels, "channel_mult": mult,
            "transformer_depth_middle": 1 if cfg.middle else -2, "use_linear_in_transformer": False,
            "context_dim": world.EMBED_DIM, "num_heads": 4, "transformer_depth_output": [1] * (2 * cfg.levels),
            "use_temporal_attention": False, "use_temporal_resblock": False}


@torch.no_grad()
def _init(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: torch defaults for every Linear/Conv, unit norms,
    zero biases, and a zero output conv (the usual diffusion init)."""
    torch.manual_seed(seed)
    for m in module.modules():      # the base classes' methods: ComfyUI's subclasses disable them
        for cls in (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break
    last = module.out[-1]
    last.weight.zero_()
    last.bias.zero_()
    left = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if left:
        raise RuntimeError(f"uninitialised parameters: {left[:5]}")


def build_model(cfg: BaseConfig, device: str = "auto"):
    """A ComfyUI BaseModel (SD15) with freshly initialised weights, in fp32."""
    start_comfyui(cpu=True if device == "cpu" else None)
    from comfyui_moa.moa_attention.comfyui.models import new_sd15_model
    model = new_sd15_model(unet_config(cfg), torch.float32, norm_groups=cfg.norm_groups)
    _init(model.diffusion_model, cfg.seed)
    return model


def training_batch(g: torch.Generator, n: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    latents, contexts = [], []
    empty = world.embed(world.caption_tokens(None, None))
    for _ in range(n):
        s = world.random_scene(g)
        latents.append(s.latent)
        contexts.append(empty if float(torch.rand((), generator=g)) < dropout else world.embed(s.tokens))
    return torch.stack(latents), torch.stack(contexts)


def training_noise(shape: tuple, g: torch.Generator, low_freq: float) -> torch.Tensor:
    """Gaussian noise plus, when `low_freq` > 0, per-channel noise constant over 16-, 8- and 4-pixel
    blocks (offset noise, Guttenberg 2023, at three scales), rescaled to unit variance.

    At SD1.5's last timestep (abar 0.0047) a 16x16 latent still leaks its colours through the mean
    of the noisy input: the mean of 256 noise pixels has std 0.06, about what 0.07 x a colour adds.
    Trained on plain noise the base reads its colours from that leak, and sampling from fresh
    noise then draws the caption's layout in random colours. With block noise the leak is buried
    and the caption has to say it."""
    noise = torch.randn(shape, generator=g)
    if not low_freq:
        return noise
    b, c, h, w = shape
    for cells in (1, 2, 4):
        coarse = torch.randn((b, c, cells, cells), generator=g)
        noise = noise + low_freq * torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
    return noise / (1 + 3 * low_freq ** 2) ** 0.5


def plain_below(noise: torch.Tensor, t: torch.Tensor, min_t: int, g: torch.Generator) -> torch.Tensor:
    """`noise` [B, ...] where t >= min_t, fresh plain Gaussian noise in the other rows (none is
    drawn when min_t is 0)."""
    if not min_t:
        return noise
    plain = torch.randn(noise.shape, generator=g)
    return torch.where((t >= min_t).view(-1, *[1] * (noise.dim() - 1)), noise, plain)


def train_base(cfg: BaseConfig, out: Path, log_every: int = 100) -> Path:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    unet = model.diffusion_model
    unet.train()
    ac = alphas_cumprod(model)
    params = [p for p in unet.parameters()]
    print(f"base UNet: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {cfg}")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params] if cfg.ema else None

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))

    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0, running = time.time(), 0.0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x0, ctx = training_batch(g, cfg.batch_size, cfg.caption_dropout)
        noise = training_noise(x0.shape, g, cfg.low_freq_noise)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        if cfg.low_freq_noise:
            noise = plain_below(noise, t, cfg.low_freq_min_t, g)
        a = ac[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), context=ctx)
        abar = a.flatten()
        if cfg.x0_weight_cap:
            # an eps error e at high noise is an x0 error e sqrt((1 - abar) / abar): the eps loss
            # hardly sees the caption's layout there, yet sampling from noise starts there
            weight = ((1 - abar) / abar).clamp(1.0, cfg.x0_weight_cap)
        else:
            weight = torch.ones_like(abar)
        loss = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                # warm-up of the decay (as diffusers' EMAModel): early weights are forgotten fast
                decay = min(cfg.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            el = time.time() - t0
            print(f"base step {step + 1}/{cfg.steps} loss {running / log_every:.4f} "
                  f"{(step + 1) / el:.2f} steps/s", flush=True)
            running = 0.0
    save_base(model, cfg, out, ema, params)
    return out


def save_base(model, cfg: BaseConfig, path: Path, ema: list | None = None, params: list | None = None) -> None:
    """The UNet's weights, or their moving average when `ema` (aligned with `params`) is given."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
    if ema is not None:
        names = {id(p): n for n, p in model.diffusion_model.named_parameters()}
        sd.update({names[id(p)]: e.contiguous() for p, e in zip(params, ema)})
    save_file(sd, str(tmp), metadata={"config": json.dumps(asdict(cfg))})
    tmp.replace(path)


#: options that cached files of older versions may still name, with the value that trains as the
#: current code does: a file made with another value matches no current config
RETIRED = {"min_snr_gamma": 0.0}
#: options added since, with the value that files of older versions (which do not name them) used
ADDED = {"low_freq_min_t": 0, "norm_groups": COMFYUI_NORM_GROUPS}


def _stored_config(path: Path) -> BaseConfig | None:
    """The BaseConfig a cached file was trained with; None when it used a retired option."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["config"])
    stored = {**ADDED, **stored}
    if any(stored.pop(key, same) != same for key, same in RETIRED.items()):
        return None
    return BaseConfig(**stored)


def load_base(path: Path, device: str = "auto"):
    """(BaseModel, BaseConfig) from a cached file; the UNet frozen, in eval mode."""
    from safetensors.torch import load_file
    cfg = _stored_config(path)
    if cfg is None:
        raise ValueError(f"{path} was trained with an option this version no longer has ({', '.join(RETIRED)}): "
                         f"train it again with python -m experiments.toy_world.base --out {path}")
    model = build_model(cfg, device)
    model.diffusion_model.load_state_dict(load_file(str(path)))
    model.diffusion_model.eval().requires_grad_(False)
    return model, cfg


def cached_config(path: Path) -> BaseConfig | None:
    """The config of the cached base at `path`; None when there is none to reuse."""
    return _stored_config(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/toy_base.safetensors"))
    d = BaseConfig()
    for k, v in asdict(d).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v) if not isinstance(v, bool) else int, default=v)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: all cores; use 1 when other jobs share the cores, where "
                        "more threads wait on each other and run slower)")
    ns = p.parse_args(argv)
    cfg = BaseConfig(**{k: (bool(v) if isinstance(getattr(d, k), bool) else v)
                        for k, v in vars(ns).items() if k not in ("out", "log_every", "threads")})
    torch.set_num_threads(ns.threads)
    train_base(cfg, ns.out, ns.log_every)
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
