"""The MoA adapter file: one .safetensors file, documented keys, metadata in its header.

Keys (PATH is the attention module's path inside the diffusion model, for example
`input_blocks.1.1.transformer_blocks.0.attn2`):

    PATH.router.fc1.weight [C/4, C]     PATH.router.fc1.bias [C/4]
    PATH.router.fc2.weight [2, C/4]     PATH.router.fc2.bias [2]        logits = [prior, personal]
    expert "full":     PATH.expert.to_q.weight [inner, C]   .to_k.weight [inner, ctx]
                       PATH.expert.to_v.weight [inner, ctx] .to_out.weight [C, inner]  .to_out.bias [C]
    expert "lowrank":  PATH.expert.{to_q,to_k,to_v,to_out}.down [r, in]  and  .up [out, r]
                       (W_personal = W_prior + up @ down)
    fusion.norm.weight [T]  fusion.norm.bias [T]
    fusion.fc1.weight [H, T+I]  fusion.fc1.bias [H]  fusion.fc2.weight [K*T, H]  fusion.fc2.bias [K*T]
                       (K = identity tokens per subject, 1 unless the header says otherwise)
    with a prompt schedule (format 4, header "moa.prompt_schedule" = "timestep_layer"):
    prompt_schedule.time.weight [W, 2F]  .time.bias [W]  prompt_schedule.layer.weight [layers, W]
    prompt_schedule.out.weight [T, W]  .out.bias [T]     (prompt_schedule.py; W = 128, F = 32)

Header metadata (all strings, as safetensors requires): see METADATA_KEYS. Reading never
unpickles anything: a file that is not safetensors is refused, not "tried with torch.load".
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import IMAGE_ENCODER_DIMS, AdapterConfig, MoAAdapter, module_key
from .bases import BASES, Base, supported_labels
from .errors import AdapterFileError, MoAInputError
from .files import atomic_write
from .unet_layers import LayerSpec

FORMAT_NAME = "comfyui-moa"
#: the newest format this pack reads
FORMAT_VERSION = 4
#: the format each base's files are written in: SD1.5 files stay version 1 (every release reads
#: them); SDXL files are version 2, so a pack without SDXL support asks for an update
BASE_FORMAT_VERSION = {"sd15": 1, "sdxl": 2}
#: files with several identity tokens per subject are version 3, so an older pack asks for an
#: update instead of failing on the fusion's shape
IDENTITY_TOKENS_VERSION = 3
#: files whose prompt depends on the timestep and layer are version 4: an older pack would run
#: them without the schedule
PROMPT_SCHEDULE_VERSION = 4
PROMPT_SCHEDULE = "timestep_layer"
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METADATA_KEYS = ("moa.format", "moa.format_version", "moa.base", "moa.expert", "moa.rank",
                 "moa.image_encoder", "moa.image_dim", "moa.text_dim", "moa.fusion_hidden",
                 "moa.layers", "moa.training", "moa.text_streams", "moa.identity_tokens",
                 "moa.prompt_schedule")


def _module_to_file_key(key: str) -> str:
    if key.startswith("layers."):
        _, mkey, rest = key.split(".", 2)
        path = mkey.replace("__", ".")
        rest = rest.replace("expert.proj.", "expert.")
        rest = re.sub(r"\.(down|up)\.weight$", r".\1", rest)
        return f"{path}.{rest}"
    return key


def file_state_dict(adapter: MoAAdapter) -> dict[str, torch.Tensor]:
    return {_module_to_file_key(k): v for k, v in adapter.state_dict().items()}


def format_version(config: AdapterConfig) -> int:
    """The oldest format that holds this adapter: its base's, 3 with several identity tokens, 4
    with a prompt schedule."""
    version = BASE_FORMAT_VERSION.get(config.base, FORMAT_VERSION)
    if config.identity_tokens > 1:
        version = max(version, IDENTITY_TOKENS_VERSION)
    return max(version, PROMPT_SCHEDULE_VERSION) if config.prompt_schedule else version


def metadata_of(config: AdapterConfig) -> dict[str, str]:
    """The header; "moa.text_streams" (the text encoders side by side in `text_dim`, which the
    fusion normalises one by one) only from format 2 on and "moa.identity_tokens" only from
    format 3 on, so older headers stay as they were."""
    version = format_version(config)
    later = {"moa.text_streams": json.dumps([[n, w] for n, w in BASES[config.base].text_streams])} \
        if version >= 2 and config.base in BASES else {}
    if version >= IDENTITY_TOKENS_VERSION:
        later["moa.identity_tokens"] = str(config.identity_tokens)
    if version >= PROMPT_SCHEDULE_VERSION:
        later["moa.prompt_schedule"] = PROMPT_SCHEDULE if config.prompt_schedule else "none"
    return {
        "moa.format": FORMAT_NAME,
        "moa.format_version": str(version),
        "moa.base": config.base,
        "moa.expert": config.expert,
        "moa.rank": str(config.rank if config.expert == "lowrank" else 0),
        "moa.image_encoder": config.image_encoder,
        "moa.image_dim": str(config.image_dim),
        "moa.text_dim": str(config.text_dim),
        "moa.fusion_hidden": str(config.fusion_hidden),
        "moa.layers": json.dumps([s.as_list() for s in config.layers]),
        "moa.training": json.dumps(config.training, sort_keys=True),
        **later,
    }


def save_adapter(adapter: MoAAdapter, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                 overwrite: bool = False) -> Path:
    """Written atomically, so a crash never leaves half an adapter where ComfyUI lists it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (trainer: --force) to replace it")
    if dtype not in ALLOWED_DTYPES:
        raise MoAInputError(f"adapters are stored as {ALLOWED_DTYPES}, not {dtype}")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in file_state_dict(adapter).items()}
    metadata = metadata_of(adapter.config)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _fail(path: Path, problem: str, fix: str) -> AdapterFileError:
    return AdapterFileError(f"MoA adapter '{path.name}': {problem}. {fix} (file: {path})")


def _config_from_metadata(path: Path, meta: dict[str, str]) -> AdapterConfig:
    if meta.get("moa.format") != FORMAT_NAME:
        raise _fail(path, "not a MoA adapter (its header has no 'moa.format' = 'comfyui-moa'; it may be a "
                          "LoRA, IP-Adapter or checkpoint)",
                    "Put only adapters written by the MoA trainer in models/moa")
    try:
        version = int(meta.get("moa.format_version", ""))
    except ValueError:
        raise _fail(path, f"unreadable format version {meta.get('moa.format_version')!r}",
                    "Re-export the adapter with the MoA trainer") from None
    if version < 1:
        raise _fail(path, f"invalid adapter format version {version}", "Re-export the adapter with the MoA trainer")
    if version > FORMAT_VERSION:
        raise _fail(path, f"written in adapter format {version}, this comfyui-moa reads up to {FORMAT_VERSION}",
                    "Update comfyui-moa (ComfyUI Manager > Update) to load it")
    base = _base_of(path, meta.get("moa.base", ""))
    _check_base_format(path, meta, base, version)
    try:
        layers = [LayerSpec.from_list(r) for r in json.loads(meta["moa.layers"])]
        config = AdapterConfig(
            layers=layers, expert=meta["moa.expert"], rank=int(meta["moa.rank"]), base=base.name,
            image_encoder=meta["moa.image_encoder"], text_dim=int(meta["moa.text_dim"]),
            image_dim=int(meta["moa.image_dim"]), fusion_hidden=int(meta["moa.fusion_hidden"]),
            identity_tokens=int(meta.get("moa.identity_tokens", "1")),
            prompt_schedule=_prompt_schedule(path, meta, version),
            training=json.loads(meta.get("moa.training") or "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(path, f"its header metadata is incomplete or malformed ({type(e).__name__}: {e})",
                    "Re-export the adapter with the MoA trainer") from None
    if config.identity_tokens < 1 or (config.identity_tokens > 1 and version < IDENTITY_TOKENS_VERSION):
        raise _fail(path, f"{config.identity_tokens} identity tokens per subject in a format {version} header "
                          f"(1 or more, and more than 1 only from format {IDENTITY_TOKENS_VERSION} on)",
                    "Re-export the adapter with the MoA trainer")
    if config.expert not in ("full", "lowrank"):
        raise _fail(path, f"unknown expert kind {config.expert!r} (expected 'full' or 'lowrank')",
                    "Re-export the adapter with the MoA trainer")
    known = IMAGE_ENCODER_DIMS.get(config.image_encoder)
    if known is not None and known != config.image_dim:
        raise _fail(path, f"image encoder {config.image_encoder} gives {known}-d features but the header says "
                          f"{config.image_dim}", "Re-export the adapter with the MoA trainer")
    if config.text_dim != base.context_dim:
        raise _fail(path, f"text embedding width {config.text_dim}, {base.label} uses {base.context_dim} "
                          f"(an adapter of another base model?)",
                    f"Use an adapter trained on an {base.label} checkpoint")
    return config


def _prompt_schedule(path: Path, meta: dict[str, str], version: int) -> bool:
    """Whether the header asks for a prompt schedule; only format 4 headers may."""
    name = meta.get("moa.prompt_schedule", "none")
    if name not in ("none", PROMPT_SCHEDULE) or (name != "none" and version < PROMPT_SCHEDULE_VERSION):
        raise _fail(path, f"prompt schedule {name!r} in a format {version} header ('none', or "
                          f"'{PROMPT_SCHEDULE}' from format {PROMPT_SCHEDULE_VERSION} on)",
                    "Re-export the adapter with the MoA trainer")
    return name == PROMPT_SCHEDULE


def _check_base_format(path: Path, meta: dict[str, str], base: Base, version: int) -> None:
    """An SDXL file is format 2 with its text streams in the header; anything else was not
    written by the MoA trainer."""
    needed = BASE_FORMAT_VERSION.get(base.name, FORMAT_VERSION)
    if version < needed:
        raise _fail(path, f"an {base.label} adapter in format {version}; {base.label} adapters are format {needed}",
                    "Re-export the adapter with the MoA trainer")
    if version < 2:
        return
    expected = [[n, w] for n, w in base.text_streams]
    try:
        streams = json.loads(meta.get("moa.text_streams", "null"))
    except ValueError:
        streams = meta.get("moa.text_streams")
    if streams != expected:
        raise _fail(path, f"text streams {streams} in its header, {base.label} has {expected}",
                    "Re-export the adapter with the MoA trainer")


def _base_of(path: Path, name: str) -> Base:
    """The header's base model, refused unless this pack runs MoA on it. A base this version
    knows but cannot run (SDXL) or does not know at all asks for a newer pack, not a re-export."""
    base = BASES.get(name)
    supported = supported_labels()
    if base is None:
        raise _fail(path, f"made for base model {name!r}, which this comfyui-moa does not know (it knows "
                          f"{', '.join(repr(b) for b in BASES)})",
                    f"Update comfyui-moa (ComfyUI Manager > Update) to load it, or use an adapter trained on an "
                    f"{supported} checkpoint")
    if not base.supported:
        raise _fail(path, f"made for {base.label} ('{base.name}'): it needs {base.label} support, which this "
                          f"version of comfyui-moa lacks (it runs MoA on {supported})",
                    f"Update comfyui-moa (ComfyUI Manager > Update) to a version with {base.label} support, or "
                    f"use an adapter trained on an {supported} checkpoint")
    return base


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found", "Put the adapter in ComfyUI/models/moa and refresh (press R)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        size = path.stat().st_size
        if _looks_like_pickle(path):
            raise _fail(path, "a pickle (.ckpt/.pt/.bin) file, which MoA never loads because unpickling can run code",
                        "Use the .safetensors adapter written by the MoA trainer") from None
        raise _fail(path, f"not a readable safetensors file, or truncated/corrupt ({size} bytes; {e})",
                    "Copy or download the adapter again") from None


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"\x80\x02" or head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def load_adapter(path: str | os.PathLike, device: str | torch.device = "cpu") -> MoAAdapter:
    """Load and validate; the file is only read, never rewritten."""
    path = Path(path)
    meta = read_adapter_metadata(path)
    config = _config_from_metadata(path, meta)
    try:
        adapter = MoAAdapter(config)
    except (RuntimeError, ValueError) as e:   # e.g. a negative rank or width in an edited header
        raise _fail(path, f"its header metadata is incomplete or malformed ({type(e).__name__}: {e})",
                    "Re-export the adapter with the MoA trainer") from None
    expected = {k: v.shape for k, v in file_state_dict(adapter).items()}
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
                if unexpected:
                    parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
                raise _fail(path, "its tensors do not match its header: " + "; ".join(parts),
                            "The file was edited or cut; export it again with the MoA trainer")
            for k in sorted(keys):
                t = f.get_tensor(k)
                if t.dtype not in ALLOWED_DTYPES:
                    raise _fail(path, f"tensor {k} has dtype {t.dtype}; adapters hold float16/bfloat16/float32",
                                "Export it again with the MoA trainer")
                if tuple(t.shape) != tuple(expected[k]):
                    raise _fail(path, f"tensor {k} has shape {list(t.shape)}, the header's layers need "
                                      f"{list(expected[k])}", "Export it again with the MoA trainer")
                tensors[k] = t
    except SafetensorError as e:
        raise _fail(path, f"truncated or corrupt ({e})", "Copy or download the adapter again") from None
    inverse = {_module_to_file_key(k): k for k in adapter.state_dict()}
    adapter.load_state_dict({inverse[k]: v.float() for k, v in tensors.items()}, strict=True)
    adapter.requires_grad_(False)
    adapter.eval()
    return adapter


def check_adapter_fits(adapter: MoAAdapter, model_layers: list[LayerSpec], adapter_name: str,
                       model_name: str = "the model") -> None:
    """Refuse an adapter whose layers differ from the model's (another architecture or depth)."""
    mine = {s.path: s for s in adapter.config.layers}
    theirs = {s.path: s for s in model_layers}
    if mine == theirs:
        return
    only_adapter = sorted(set(mine) - set(theirs))
    only_model = sorted(set(theirs) - set(mine))
    differing = [p for p in sorted(set(mine) & set(theirs)) if mine[p] != theirs[p]]
    detail = []
    if differing:
        p = differing[0]
        a, m = mine[p], theirs[p]
        detail.append(f"layer {p}: adapter expects query/context/inner width {a.query_dim}/{a.context_dim}/"
                      f"{a.inner_dim}, {a.heads} heads, model has {m.query_dim}/{m.context_dim}/{m.inner_dim}, "
                      f"{m.heads} heads")
    if only_adapter:
        detail.append(f"{len(only_adapter)} adapter layer(s) not in the model, e.g. {only_adapter[0]}")
    if only_model:
        detail.append(f"{len(only_model)} model layer(s) the adapter lacks, e.g. {only_model[0]}")
    raise AdapterFileError(
        f"MoA adapter '{adapter_name}' does not fit {model_name}: " + "; ".join(detail)
        + ". Use an adapter trained on this base model (SD1.5 adapters need an SD1.5 checkpoint, SDXL adapters an SDXL one).")


__all__ = ["AdapterFileError", "FORMAT_VERSION", "check_adapter_fits", "load_adapter", "read_adapter_metadata",
           "save_adapter", "file_state_dict", "metadata_of", "module_key"]
