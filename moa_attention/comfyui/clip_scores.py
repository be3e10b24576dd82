"""CLIP numbers with ComfyUI's CLIP objects: prompt fidelity (image-text cosine) and subject
identity for any subject (cosine of CLIP image embeddings of masked subject crops).

Which text encoders work. An image-text score compares the CLIP *projected* text embedding with
the projected image embedding, so the text encoder must carry CLIP's `text_projection`. In
ComfyUI 0.3.75 every SD1.5 CLIP object has a `text_projection` layer
(comfy/clip_model.py CLIPTextModel), but loading an SD1.5 checkpoint never fills it: SD1.5
checkpoints do not store it (SD15.process_clip_state_dict_for_saving drops it) and the loader
silences the missing key, so the layer keeps uninitialised memory. Nothing on the loaded object
tells the two apart, so the pack decides from the FILE: a text encoder file whose keys include
`text_projection.weight` (or the older `text_projection`) — e.g. the full OpenAI CLIP ViT-L/14
`model.safetensors` (openai/clip-vit-large-patch14, text and vision in one file), or a
`clip_l.safetensors` that kept the projection. Its image side must be the matching CLIP vision
model (ViT-L/14, 768-d embeddings, what MoA uses anyway).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch.nn import functional as F

from ..engine.errors import ModelMismatchError
from .models import image_feature_dim, sd15_tokenizer
from .subjects import subject_feature

PROJECTION_KEYS = ("text_projection.weight", "text_projection")
WORKING_FILES = ("a CLIP text encoder file that includes text_projection.weight, e.g. OpenAI's full CLIP ViT-L/14 "
                 "model.safetensors (huggingface.co/openai/clip-vit-large-patch14: text and vision in one file, "
                 "put it in models/text_encoders; the same file also loads in Load CLIP Vision) or a "
                 "clip_l.safetensors that kept the projection")
TEXT_DIM = 768


def file_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def check_text_projection(path: Path | str) -> None:
    """Refuse a text encoder file without CLIP's text projection, before loading it."""
    path = Path(path)
    if not path.is_file():
        raise ModelMismatchError(f"text encoder file not found: {path}")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelMismatchError(f"text encoder {path.name}: only .safetensors files are read. Use {WORKING_FILES}")
    try:
        keys = file_keys(path)
    except Exception as e:   # noqa: BLE001 - any header problem is the same refusal
        raise ModelMismatchError(f"text encoder {path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    if not any(k in keys for k in PROJECTION_KEYS):
        hint = (" It looks like the text encoder of an SD1.5 checkpoint, which never stores the projection."
                if any(k.startswith(("text_model.", "clip_l.", "cond_stage_model.")) for k in keys) else "")
        raise ModelMismatchError(
            f"text encoder {path.name} has no text projection (no text_projection.weight key), so it cannot score "
            f"images against prompts: without CLIP's projection its text embedding does not live in the image "
            f"embedding's space.{hint} Use {WORKING_FILES}")


_TEXT_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def load_text_encoder(path: Path | str):
    """A ComfyUI CLIP (SD1.5-type, CLIP-L) from a text encoder file that has the projection;
    cached per file (path, size, mtime)."""
    path = Path(path)
    check_text_projection(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _TEXT_CACHE:
            return _TEXT_CACHE[key]
    import comfy.sd
    try:
        clip = comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    except Exception as e:   # noqa: BLE001
        raise ModelMismatchError(f"text encoder {path.name} could not be loaded as a CLIP-L text encoder "
                                 f"({type(e).__name__}: {e}). Use {WORKING_FILES}") from e
    check_text_encoder(clip, path.name)
    with _LOCK:
        _TEXT_CACHE.clear()               # one text encoder at a time: they are 123M parameters
        _TEXT_CACHE[key] = clip
    return clip


def check_text_encoder(clip, label: str = "text encoder") -> None:
    try:
        sd15_tokenizer(clip)
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{label}: {e}. Use {WORKING_FILES}") from e
    proj = getattr(getattr(getattr(clip.cond_stage_model, "clip_l", None), "transformer", None), "text_projection", None)
    if getattr(proj, "out_features", None) != TEXT_DIM:
        raise ModelMismatchError(f"{label} is not a CLIP-L text encoder with a {TEXT_DIM}-d projection. "
                                 f"Use {WORKING_FILES}")


def check_clip_vision(clip_vision, label: str = "clip_vision") -> None:
    if clip_vision is None:
        raise ModelMismatchError(f"{label} is None. Load the CLIP ViT-L/14 vision model with Load CLIP Vision")
    dim = image_feature_dim(clip_vision)
    if dim is not None and dim != TEXT_DIM:
        raise ModelMismatchError(f"{label} gives {dim}-d image embeddings, but the CLIP-L text encoder gives "
                                 f"{TEXT_DIM}-d ones: an image-text score needs the matching pair. Load the CLIP "
                                 f"ViT-L/14 vision model")


@torch.no_grad()
def image_embeddings(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """[B, D] unit CLIP image embeddings of whole pictures (ComfyUI's CLIP preprocessing: resize the
    short side and centre-crop to the encoder's size, as CLIP was trained)."""
    embeds = clip_vision.encode_image(images[..., :3], crop=True)["image_embeds"].float().cpu()
    return F.normalize(embeds, dim=-1)


def _projection(clip) -> torch.nn.Module:
    return clip.cond_stage_model.clip_l.transformer.text_projection


@torch.no_grad()
def text_embedding(clip, prompt: str) -> torch.Tensor:
    """[D] unit projected CLIP text embedding: the final-layer EOS embedding of the first 77-token
    chunk through `text_projection`, what CLIP compares with images. ComfyUI's SD1.5 text encoder
    (SD1CheckpointClipModel, return_projected_pooled=False) returns the pooled output UNprojected
    even for return_pooled=True, so the projection is applied here."""
    tokens = clip.tokenize(prompt)
    _, pooled = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    if pooled is None:
        raise ModelMismatchError(f"the text encoder returned no pooled output. Use {WORKING_FILES}")
    weight = _projection(clip).weight.detach().float().cpu()
    projected = pooled.float().cpu().reshape(-1, pooled.shape[-1])[0] @ weight.T
    return F.normalize(projected, dim=-1)


def prompt_fidelity(clip, clip_vision, images: torch.Tensor, prompts: list[str]) -> list[float]:
    """Cosine of each picture's CLIP image embedding with its prompt's text embedding (one prompt
    for all pictures, or one per picture)."""
    check_text_encoder(clip)
    check_clip_vision(clip_vision)
    if len(prompts) not in (1, images.shape[0]):
        raise ValueError(f"{images.shape[0]} picture(s) but {len(prompts)} prompts: give one, or one per picture")
    img = image_embeddings(clip_vision, images)
    texts = {p: text_embedding(clip, p) for p in dict.fromkeys(prompts)}
    return [float(img[i] @ texts[prompts[0] if len(prompts) == 1 else prompts[i]]) for i in range(img.shape[0])]


def subject_embedder(clip_vision):
    """What scoring.evaluator.Evaluator takes: (images [N, H, W, 3], masks, label) -> mean embedding [D]."""
    if clip_vision is None:
        raise ModelMismatchError("clip_vision is None. Load the CLIP ViT-L/14 vision model with Load CLIP Vision")
    return lambda images, masks, label: subject_feature(clip_vision, images, masks, label)


def prompt_scorer(clip, clip_vision):
    """What scoring.evaluator.Evaluator takes: (image [H, W, 3], prompt) -> image-text cosine."""
    check_text_encoder(clip)
    check_clip_vision(clip_vision)
    return lambda image, prompt: prompt_fidelity(clip, clip_vision, image[None], [prompt])[0]
