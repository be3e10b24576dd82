"""MoA Evaluate: identity, prompt fidelity and context preservation of generated pictures, as text
and a small comparison grid (how to read them: docs/evaluation.md)."""
from __future__ import annotations

import torch

from ..moa_attention.comfyui import clip_scores
from ..moa_attention.engine.router_maps import heat_colors
from ..moa_attention.faces import align
from ..moa_attention.scoring.evaluator import Evaluator, Picture
from ..moa_attention.scoring.report import comparison_grid, difference_image, text_table
from .common import CATEGORY, check_finite, refusals, refuse
from .face_align import face_model_names, face_model_root

NODE = "MoA Evaluate"
NONE = "none"
TEXT_FOLDER = "text_encoders"


def text_encoder_names() -> list[str]:
    import folder_paths
    try:
        files = folder_paths.get_filename_list(TEXT_FOLDER)
    except KeyError:
        files = []
    return [NONE, *files]


def _per_picture(t: torch.Tensor | None, i: int, name: str, batch: int) -> torch.Tensor | None:
    """Item i of an optional batch that has one entry for all pictures or one per picture."""
    if t is None:
        return None
    if t.shape[0] not in (1, batch):
        raise refuse(NODE, f"{name} has {t.shape[0]} entries for {batch} pictures: give one for all, or one per "
                           f"picture")
    return t[0 if t.shape[0] == 1 else i]


def _evaluator(reference, clip_vision, prompt, text_encoder, face_model, provider) -> Evaluator:
    ev = Evaluator()
    if face_model != NONE and reference is not None:
        from ..moa_attention.faces import identity
        ev.face_embedding = identity.face_embedder_for(face_model_root(face_model), face_model, provider)
    if clip_vision is not None and reference is not None:
        ev.subject_embedding = clip_scores.subject_embedder(clip_vision)
    if prompt.strip() and text_encoder != NONE:
        if clip_vision is None:
            raise refuse(NODE, "prompt fidelity needs clip_vision too (the CLIP ViT-L/14 vision model that pairs "
                               "with the text encoder). Connect Load CLIP Vision, or set text_encoder to none")
        import folder_paths
        path = folder_paths.get_full_path_or_raise(TEXT_FOLDER, text_encoder)
        ev.prompt_score = clip_scores.prompt_scorer(clip_scores.load_text_encoder(path), clip_vision)
    return ev


class MoAEvaluate:
    DESCRIPTION = ("Numbers for MoA's claims on your own pictures: identity (ArcFace for faces, CLIP image "
                   "similarity for any subject), prompt fidelity (CLIP image-text score) and context preservation "
                   "(change inside vs outside the subject against a baseline made with the same seed without the "
                   "subject or at strength 0, and the router's background share). Connect what you have: each "
                   "number is computed when its inputs are there. The pack's docs/evaluation.md says how to "
                   "read them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "grid")
    OUTPUT_TOOLTIPS = ("The numbers as a text table, one line per picture, the mean, what each column means and "
                       "any per-picture problem (e.g. no face found). Connect it to Preview as Text to read it.",
                       "One row per picture: reference, baseline, picture, difference to the baseline (white = "
                       "changed, subject outline in green), router map (red = subject expert).")
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated pictures to score (a batch)."}),
        }, "optional": {
            "baseline": ("IMAGE", {"tooltip": "The same pictures without the subject: same seed and settings with "
                                              "MoA strength 0 (or without MoA Apply). Needed for context "
                                              "preservation. One per picture, or one for all."}),
            "subject_mask": ("MASK", {"tooltip": "Where the subject is in the pictures (1 = subject), at their size: "
                                                 "splits the change into inside and outside, and crops the subject "
                                                 "for the CLIP identity. E.g. the region mask you gave MoA Subject."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output latent for the pictures (optional): with "
                                              "baseline_samples, the change on latents inside and outside the "
                                              "subject mask, free of the VAE's decoding."}),
            "baseline_samples": ("LATENT", {"tooltip": "The baseline's sampler output (same seed without the "
                                                       "subject, or strength 0)."}),
            "router_mask": ("MASK", {"tooltip": "The mask output of MoA Router Maps (the router's personalized "
                                                "share): gives its share on the subject and on the background."}),
            "reference": ("IMAGE", {"tooltip": "Photo(s) of the subject (what you gave MoA Subject). Needed for "
                                               "the identity numbers."}),
            "reference_mask": ("MASK", {"tooltip": "The subject in the reference photo(s) (1 = subject), for the "
                                                   "CLIP identity crop."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision model (Load CLIP Vision): the CLIP "
                                                       "identity of any subject, and the image side of the prompt "
                                                       "score."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                  "The prompt the pictures were made with, for the prompt score (write the class "
                                  "word, e.g. 'a man', as the prompt says)."}),
            "text_encoder": (text_encoder_names(), {"default": NONE, "tooltip":
                             "A CLIP text encoder file WITH its text projection, from models/text_encoders: e.g. "
                             "OpenAI's full CLIP ViT-L/14 model.safetensors (openai/clip-vit-large-patch14). An "
                             "SD1.5 checkpoint's text encoder has no projection and is refused. none = no prompt "
                             "score."}),
            "face_model": ([NONE, *face_model_names()], {"default": NONE, "tooltip":
                           "insightface model folder in models/insightface/models/ with a detector and a "
                           "recognition model (buffalo_l: det_10g.onnx + w600k_r50.onnx; antelopev2: "
                           "scrfd_10g_bnkps.onnx + glintr100.onnx) for the ArcFace identity of people. none = skip."}),
            "provider": (list(align.PROVIDERS), {"default": "CPU", "tooltip":
                         "Where onnxruntime runs the face models (falls back to the CPU with a warning)."}),
            "tile": ("INT", {"default": 160, "min": 64, "max": 512, "step": 16,
                             "tooltip": "Side of each tile in the comparison grid, in pixels."}),
        }}

    def evaluate(self, images, baseline=None, subject_mask=None, samples=None, baseline_samples=None,
                 router_mask=None, reference=None, reference_mask=None, clip_vision=None, prompt="",
                 text_encoder=NONE, face_model=NONE, provider="CPU", tile=160):
        if images.ndim != 4 or images.shape[-1] < 3:
            raise refuse(NODE, f"images must be an IMAGE batch [B, H, W, 3], got shape {list(images.shape)}")
        b = images.shape[0]
        check_finite(NODE, images=images, baseline=baseline, subject_mask=subject_mask, samples=samples,
                     baseline_samples=baseline_samples, router_mask=router_mask, reference=reference,
                     reference_mask=reference_mask)
        if reference_mask is not None and reference is None:
            raise refuse(NODE, "reference_mask is connected but reference is not: connect the reference photo(s)")
        with refusals(NODE):
            ev = _evaluator(reference, clip_vision, prompt, text_encoder, face_model, provider)
        rows, tiles = [], []
        for i in range(b):
            pic = Picture(image=images[i, ..., :3].cpu(), label=f"picture {i + 1}",
                          baseline=_cpu(_per_picture(baseline, i, "baseline", b)),
                          mask=_cpu(_per_picture(subject_mask, i, "subject_mask", b)),
                          router_map=_cpu(_per_picture(router_mask, i, "router_mask", b)),
                          prompt=prompt.strip() or None, references=_cpu(reference),
                          reference_masks=_cpu(reference_mask), reference_key="reference",
                          latent=_cpu(_per_picture(_latent(samples), i, "samples", b)),
                          baseline_latent=_cpu(_per_picture(_latent(baseline_samples), i, "baseline_samples", b)))
            scores = ev.score(pic)
            rows.append({"label": pic.label, **scores})
            diff = (difference_image(pic.baseline, pic.image, pic.mask)
                    if pic.baseline is not None and pic.baseline.shape == pic.image.shape else None)
            heat = heat_colors(pic.router_map[None])[0] if pic.router_map is not None else None
            tiles.append([None if reference is None else reference[0], pic.baseline, pic.image, diff, heat])
        text = _report(rows, images, ev, baseline=baseline, subject_mask=subject_mask, reference=reference,
                       samples=samples, baseline_samples=baseline_samples)
        grid = comparison_grid(tiles, tile=tile)
        return {"ui": {"text": [text]}, "result": (text, grid)}


def _latent(samples):
    return None if samples is None else samples["samples"]


def _cpu(t):
    return None if t is None else t.detach().cpu().float()


def _skipped(ev: Evaluator, baseline, subject_mask, reference, samples, baseline_samples) -> list[str]:
    """The metric groups not computed for want of an input, each with the input to connect."""
    skipped = []
    if reference is None:
        skipped.append("identity (connect reference)")
    elif ev.face_embedding is None and ev.subject_embedding is None:
        skipped.append("identity (choose a face_model or connect clip_vision)")
    if ev.prompt_score is None:
        skipped.append("prompt score (write the prompt, choose a text_encoder, connect clip_vision)")
    if baseline is None:
        skipped.append("context preservation (connect baseline and subject_mask)")
    elif subject_mask is None:
        skipped.append("context preservation (connect subject_mask)")
    if (samples is None) != (baseline_samples is None):
        have, missing = ("samples", "baseline_samples") if baseline_samples is None else ("baseline_samples", "samples")
        skipped.append(f"latent change ({have} is connected but {missing} is not: connect both sampler outputs, "
                       f"the pictures' and the baseline's)")
    return skipped


def _mask_notes(subject_mask) -> list[str]:
    """Why inside or outside numbers are missing: a subject mask with no subject, or no background."""
    if subject_mask is None:
        return []
    masks = subject_mask.reshape(-1, *subject_mask.shape[-2:]) > 0.5
    empty = [str(i + 1) for i in range(masks.shape[0]) if not bool(masks[i].any())]
    full = [str(i + 1) for i in range(masks.shape[0]) if bool(masks[i].all())]
    notes = []
    if empty:
        notes.append(f"subject_mask {', '.join(empty)} is empty (no pixel above 0.5): the numbers inside the subject "
                     f"are missing (NaN). Connect a mask that covers the subject (1 = subject)")
    if full:
        notes.append(f"subject_mask {', '.join(full)} covers the whole picture: the numbers outside the subject are "
                     f"missing (NaN). Connect a mask of the subject only")
    return notes


def _report(rows, images, ev: Evaluator, *, baseline, subject_mask, reference, samples, baseline_samples) -> str:
    lines = [f"MoA Evaluate: {images.shape[0]} picture(s), {images.shape[2]}x{images.shape[1]}"]
    skipped = _skipped(ev, baseline, subject_mask, reference, samples, baseline_samples)
    if skipped:
        lines.append("not computed: " + "; ".join(skipped))
    lines += ["", text_table(rows)]
    problems = _mask_notes(subject_mask) + [f"{r['label']}: {e}" for r in rows for e in r["errors"]]
    if problems:
        lines += ["", "problems:"] + [f"  {p}" for p in problems]
    return "\n".join(lines)
