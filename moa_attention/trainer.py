"""The MoA training loop, on the same MoAAttention/MoAAdapter modules the nodes run.

The frozen encoders (VAE, text encoder, image encoder) run once, before the loop, so each
step only runs the UNet with its MoA layers. Data order, noise and timesteps come from
(seed, step, rank): a resumed run draws exactly what the interrupted one would have drawn.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import MoAAdapter, init_adapter_from_unet
from .adapter_io import load_adapter, save_adapter
from .attention_fn import sdpa_attention
from .call_state import STATE_KEY, CallState, MoASettings
from .dataset import load_image, load_mask, read_manifest
from .fusion import fuse_prompt
from .layer import install_layers
from .losses import background_share, denoising_loss, object_loss, router_loss
from .prompt_tokens import bind_subjects
from .subject_images import prepare_subject_batch
from .train import TrainConfig
from .train_state import STATE_FILE, load_trainer_state, save_trainer_state

LOG_FIELDS = ["step", "loss", "denoise", "router", "object", "bg_share", "fg_share", "lr", "seconds"]


@dataclass
class Example:
    latent: torch.Tensor            # [4, h, w] scaled latent
    text: torch.Tensor              # [L, 768] text-encoder output
    positions: list[list[int]]      # per subject, token positions
    features: list[torch.Tensor]    # per subject, [768] image feature
    masks: torch.Tensor             # [S, h, w] latent-resolution subject masks
    caption: str


# ----------------------------------------------------------------------------- setup

def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _prepare_output(cfg: TrainConfig, rank: int) -> None:
    out = cfg.output_dir
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.resume:
        if not cfg.force:
            raise SystemExit(f"{out} is not empty: pass --resume to continue that run or --force to start over "
                             f"(which deletes its checkpoints, samples and log)")
        for child in ("checkpoints", "samples", "loss_log.csv", "adapter.safetensors", "config.json", "summary.json"):
            p = out / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(parents=True, exist_ok=True)


def _load_comfy(cfg: TrainConfig, device: torch.device):
    import comfy.cli_args
    if device.type == "cpu":
        comfy.cli_args.args.cpu = True
    import comfy.clip_vision
    import comfy.sd
    for label, path in (("--base", cfg.base), ("--clip-vision", cfg.clip_vision)):
        if not Path(path).is_file():
            raise SystemExit(f"{label}: file not found: {path}")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(cfg.base), output_vae=True, output_clip=True)
    if clip is None:
        raise SystemExit(f"--base {cfg.base} has no text encoder: use a full SD1.5 checkpoint")
    unet_cfg = model.model.model_config.unet_config
    if unet_cfg.get("context_dim") != 768:
        raise SystemExit(f"--base {cfg.base} is not SD1.5 (context_dim {unet_cfg.get('context_dim')})")
    clip_vision = comfy.clip_vision.load(str(cfg.clip_vision))
    if clip_vision is None:
        raise SystemExit(f"--clip-vision {cfg.clip_vision} is not a CLIP vision model ComfyUI recognises")
    return model, clip, vae, clip_vision


@torch.no_grad()
def _precompute(cfg: TrainConfig, records, model, clip, vae, clip_vision, show: bool) -> list[Example]:
    from tqdm import tqdm

    from .comfy_prompt import describe, token_chunks, word_tokens
    examples = []
    latent_size = cfg.resolution // 8
    for rec in tqdm(records, desc="encoding dataset", disable=not show):
        image = load_image(rec.image, cfg.resolution)
        latent = model.model.process_latent_in(vae.encode(image[None])).float()[0]
        tokens, chunks = token_chunks(clip, rec.caption)
        if len(chunks) != 1:
            raise SystemExit(f"{cfg.data}/manifest.jsonl line {rec.line}: caption longer than 75 tokens; shorten it")
        words = [word_tokens(clip, s.class_word) for s in rec.subjects]
        positions = bind_subjects(chunks, words, describe_tokens=lambda c: describe(clip, c))
        text = clip.encode_from_tokens(tokens)[0].float().cpu()
        features, masks = [], []
        for s in rec.subjects:
            refs = torch.stack([load_image(p, 224) for p in s.references])
            ref_masks = torch.stack([load_mask(p, 224) for p in s.reference_masks]) if s.reference_masks else None
            prepared = prepare_subject_batch(refs, ref_masks, label=f"line {rec.line} '{s.class_word}'")
            features.append(clip_vision.encode_image(prepared, crop=False)["image_embeds"].float().mean(0).cpu())
            masks.append(load_mask(s.mask, latent_size))
        examples.append(Example(latent.cpu(), text, positions, features, torch.stack(masks), rec.caption))
    return examples


def _cache_key(cfg: TrainConfig, records) -> str:
    """Changes whenever anything the frozen encoders see changes (files by size and mtime)."""
    import hashlib
    h = hashlib.sha256()
    files = [cfg.base, cfg.clip_vision, Path(cfg.data) / "manifest.jsonl"]
    for rec in records:
        files.append(rec.image)
        for s in rec.subjects:
            files += [s.mask, *s.references, *(s.reference_masks or [])]
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"res={cfg.resolution}|v1".encode())
    return h.hexdigest()[:24]


def _cache_dir() -> Path:
    root = os.environ.get("MOA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "comfyui-moa")
    return Path(root) / "encoded"


def _save_examples(path: Path, examples: list[Example]) -> None:
    from safetensors.torch import save_file
    tensors, meta = {}, []
    for i, e in enumerate(examples):
        tensors[f"{i}.latent"], tensors[f"{i}.text"], tensors[f"{i}.masks"] = e.latent, e.text, e.masks
        for j, f in enumerate(e.features):
            tensors[f"{i}.feature.{j}"] = f
        meta.append({"positions": e.positions, "caption": e.caption})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"examples": json.dumps(meta)})
    tmp.replace(path)


def _load_examples(path: Path) -> list[Example]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["examples"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    return [Example(t[f"{i}.latent"], t[f"{i}.text"], m["positions"],
                    [t[f"{i}.feature.{j}"] for j in range(len(m["positions"]))], t[f"{i}.masks"], m["caption"])
            for i, m in enumerate(meta)]


def encoded_examples(cfg: TrainConfig, records, model, clip, vae, clip_vision, show: bool) -> list[Example]:
    """The dataset through the frozen encoders, cached on disk (safetensors) between runs:
    resuming, or training again on the same data, skips minutes of image encoding."""
    path = _cache_dir() / f"{_cache_key(cfg, records)}.safetensors"
    if path.is_file():
        return _load_examples(path)
    examples = _precompute(cfg, records, model, clip, vae, clip_vision, show)
    try:
        _save_examples(path, examples)
    except OSError as e:
        print(f"note: could not cache the encoded dataset in {path.parent} ({e})")
    return examples


# ----------------------------------------------------------------------------- the step

class MoATrainStep(nn.Module):
    """One forward: fuse the prompts, noise the latents, run the UNet with MoA, return losses.

    The adapter is the only registered submodule, so DistributedDataParallel syncs exactly
    the trainable weights; the frozen UNet is held as a plain attribute."""

    def __init__(self, adapter: MoAAdapter, diffusion_model: nn.Module, alphas_cumprod: torch.Tensor,
                 cfg: TrainConfig) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", diffusion_model)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.cfg = cfg

    def forward(self, batch: list[Example], noise: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.alphas_cumprod.device
        x0 = torch.stack([e.latent for e in batch]).to(device)
        text = torch.stack([e.text for e in batch]).to(device)
        fused = torch.stack([fuse_prompt(self.adapter.fusion, e.text.to(device),
                                         [(p, f.to(device)) for p, f in zip(e.positions, e.features)])
                             for e in batch])
        s_max = max(e.masks.shape[0] for e in batch)
        masks = torch.zeros(len(batch), s_max, *x0.shape[-2:], device=device)
        for i, e in enumerate(batch):
            masks[i, : e.masks.shape[0]] = e.masks.to(device)
        ac = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        captured: list = []
        state = CallState(rows=torch.arange(len(batch), device=device), personal_context=fused, regions=None,
                          latent_index=list(range(len(batch))), settings=MoASettings(), recorder=None,
                          latent_hw=tuple(x0.shape[-2:]), latent_batch=len(batch), capture=captured,
                          subject_tokens=[e.positions for e in batch])
        pred = self.unet(noisy, timesteps.float(), context=text, transformer_options={STATE_KEY: state})
        hw = tuple(x0.shape[-2:])
        losses = {"denoise": denoising_loss(pred, noise, masks, self.cfg.subject_loss_weight),
                  "router": router_loss(captured, masks, hw),
                  "object": object_loss(captured, masks, [e.masks.shape[0] for e in batch], hw)}
        losses["loss"] = (losses["denoise"] + self.cfg.router_loss_weight * losses["router"]
                          + self.cfg.object_loss_weight * losses["object"])
        bg, fg = background_share(captured, masks, hw)
        losses["bg_share"], losses["fg_share"] = torch.tensor(bg), torch.tensor(fg)
        return losses


def _draw(step: int, rank: int, cfg: TrainConfig, n_examples: int, shape: tuple, device) -> tuple:
    """Batch indices, noise and timesteps of one step: a function of (seed, step, rank) only."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
    idx = torch.randint(0, n_examples, (cfg.batch_size,), generator=g).tolist()
    noise = torch.randn((cfg.batch_size, *shape), generator=g).to(device)
    timesteps = torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(device)
    return idx, noise, timesteps


def _enable_checkpointing(diffusion_model: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint
    for module in diffusion_model.modules():
        if hasattr(module, "attn1") and hasattr(module, "ff"):        # BasicTransformerBlock
            original = module.forward

            def wrapped(*args, _f=original, **kwargs):
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)
            module.forward = wrapped


@torch.no_grad()
def evaluate(step_module: nn.Module, examples: list[Example], cfg: TrainConfig, device) -> dict[str, float]:
    """Losses on fixed noise and timesteps over every example: comparable before/after."""
    shape = tuple(examples[0].latent.shape)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    totals: dict[str, float] = {}
    for e in examples:
        noise = torch.randn((1, *shape), generator=g).to(device)
        timesteps = torch.tensor([250, 500, 750])[torch.randint(0, 3, (1,), generator=g)].to(device)
        for k, v in step_module([e], noise, timesteps).items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(examples)
    return totals


# ----------------------------------------------------------------------------- outputs

def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())


def _save_checkpoint(cfg, adapter, optimizer, names, step: int) -> Path:
    d = cfg.output_dir / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, d / "adapter.safetensors", dtype=torch.float32, overwrite=True)
    save_trainer_state(d / STATE_FILE, optimizer, names, step)
    for old in _checkpoints(cfg.output_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return d


def _write_sample(cfg, model, vae, adapter, example: Example, step: int, device=None) -> Path:
    """Sample through ComfyUI's own sampler with the MoA patch, exactly as the nodes run."""
    import comfy.sample
    from PIL import Image

    from .call_state import SubjectBinding
    from .comfy_patch import apply_moa
    with torch.no_grad():
        fused = fuse_prompt(adapter.fusion, example.text, list(zip(example.positions, example.features)))
    patched = apply_moa(model, adapter, [SubjectBinding(example.text, fused)], adapter_name="training")
    latent = torch.zeros(1, 4, cfg.resolution // 8, cfg.resolution // 8)
    noise = comfy.sample.prepare_noise(latent, cfg.seed)
    positive = [[example.text[None], {}]]
    negative = [[torch.zeros_like(example.text)[None], {}]]
    with torch.no_grad():
        samples = comfy.sample.sample(patched, noise, cfg.sample_steps, 5.0, "euler", "normal", positive, negative,
                                      latent, disable_pbar=True, seed=cfg.seed)
        image = vae.decode(model.model.process_latent_out(samples))[0].clamp(0, 1)
    # ComfyUI keeps the last sampled model loaded (patched) and may offload the adapter: undo
    # both so training continues on its own modules and device
    import comfy.model_management
    comfy.model_management.unload_all_models()
    if device is not None:
        adapter.to(device)
    path = cfg.output_dir / "samples" / f"step_{step:06d}.png"
    Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8")).save(path)
    return path


# ----------------------------------------------------------------------------- the loop

def run(cfg: TrainConfig) -> int:
    from tqdm import tqdm

    rank, world, local_rank = _dist_info()
    device = _device(cfg, local_rank)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    _prepare_output(cfg, rank)
    records, problems = read_manifest(cfg.data)
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:50])
        raise SystemExit(f"dataset {cfg.data} has {len(problems)} problem(s); fix them first "
                         f"(python -m moa_attention.dataset {cfg.data}):\n{listing}")

    model, clip, vae, clip_vision = _load_comfy(cfg, device)
    examples = encoded_examples(cfg, records, model, clip, vae, clip_vision, show=rank == 0)
    diffusion_model = model.model.diffusion_model.to(device)
    diffusion_model.requires_grad_(False)        # ComfyUI leaves requires_grad on: the prior must stay frozen
    diffusion_model.eval()
    sigmas = model.model.model_sampling.sigmas.float()
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)

    checkpoints = _checkpoints(cfg.output_dir) if cfg.resume else []
    if cfg.resume and not checkpoints and rank == 0:
        print(f"--resume: no checkpoint in {cfg.output_dir / 'checkpoints'} yet, starting from a fresh adapter")
    if checkpoints:
        adapter = load_adapter(checkpoints[-1] / "adapter.safetensors")
        adapter.requires_grad_(True)
    else:
        adapter = init_adapter_from_unet(diffusion_model, expert=cfg.expert, rank=cfg.rank, seed=cfg.seed)
    adapter.config.training = {k: str(v) for k, v in asdict(cfg).items() if k != "extra"}
    adapter.to(device).train()
    install_layers(diffusion_model, adapter, sdpa_attention)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(diffusion_model)

    step_module: nn.Module = MoATrainStep(adapter, diffusion_model, alphas_cumprod, cfg).to(device)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    params = [p for p in adapter.parameters() if p.requires_grad]
    names = {i: n for i, (n, p) in enumerate((n, p) for n, p in adapter.named_parameters() if p.requires_grad)}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if checkpoints:
        start, _ = load_trainer_state(checkpoints[-1] / STATE_FILE, optimizer, names)
    if rank == 0:
        (cfg.output_dir / "config.json").write_text(json.dumps(adapter.config.training, indent=2))

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
    log_path = cfg.output_dir / "loss_log.csv"
    log_file = None
    if rank == 0:
        new_log = not log_path.exists() or not cfg.resume
        log_file = open(log_path, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
        if new_log:
            writer.writeheader()
    shape = tuple(examples[0].latent.shape)
    plain_step = step_module.module if hasattr(step_module, "module") else step_module
    eval_before = evaluate(plain_step, examples, cfg, device) if rank == 0 else {}
    bar = tqdm(total=cfg.steps, initial=start, desc="training", disable=rank != 0)
    step = start
    t0 = time.time()
    try:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx, noise, timesteps = _draw(step * cfg.grad_accum + micro, rank, cfg, len(examples), shape, device)
                with autocast():
                    losses = step_module([examples[i] for i in idx], noise, timesteps)
                loss = losses["loss"] / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", router=f"{totals['router']:.3f}",
                            bg=f"{totals['bg_share']:.3f}")
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                writer.writerow({"step": step, **{k: f"{totals[k]:.6g}" for k in
                                                  ("loss", "denoise", "router", "object", "bg_share", "fg_share")},
                                 "lr": cfg.lr, "seconds": f"{time.time() - t0:.2f}"})
                log_file.flush()
            if rank == 0 and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_checkpoint(cfg, adapter, optimizer, names, step)
            if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0:
                _write_sample(cfg, model, vae, adapter, examples[0], step, device)
            if not math.isfinite(totals["loss"]):
                raise SystemExit(f"loss became {totals['loss']} at step {step}: lower --lr or use --mixed-precision no")
    except KeyboardInterrupt:
        if rank == 0:
            d = _save_checkpoint(cfg, adapter, optimizer, names, step)
            print(f"\ninterrupted at step {step}: checkpoint kept in {d}; continue with --resume")
        return 130
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if rank == 0:
        if not cfg.checkpoint_every or step % cfg.checkpoint_every:
            _save_checkpoint(cfg, adapter, optimizer, names, step)
        final = save_adapter(adapter, cfg.output_dir / "adapter.safetensors", overwrite=True)
        summary = {"steps": step, "eval_before": eval_before,
                   "eval_after": evaluate(plain_step, examples, cfg, device)}
        (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {final} after {step} steps; eval loss {eval_before.get('loss', float('nan')):.4f} -> "
              f"{summary['eval_after']['loss']:.4f}, background share of the personalized expert "
              f"{eval_before.get('bg_share', float('nan')):.3f} -> {summary['eval_after']['bg_share']:.3f}")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0
