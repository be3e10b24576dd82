"""MoA Subject Morph: one subject's identity interpolated towards another's."""
from __future__ import annotations

import dataclasses

import torch

from ..moa_attention.engine.morph import check_factors, sequence_factors
from .common import CATEGORY, SUBJECTS_TYPE, refusals, refuse

NODE = "MoA Subject Morph"
MODES = ("single", "sequence")
MAX_FRAMES = 64


def same_noise_batch(latent: dict, count: int) -> dict:
    """The latent repeated `count` times with one batch_index for all: ComfyUI's samplers then
    give every image the same noise for the seed (comfy.sample.prepare_noise), so the frames
    differ only by the morph factor."""
    samples = latent["samples"]
    index = int((latent.get("batch_index") or [0])[0])
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = samples[:1].repeat(count, *([1] * (samples.ndim - 1)))
    out["batch_index"] = [index] * count
    if "noise_mask" in latent:
        out["noise_mask"] = latent["noise_mask"][:1].repeat(count, *([1] * (latent["noise_mask"].ndim - 1)))
    return out


class MoASubjectMorph:
    DESCRIPTION = ("Morphs subject A into subject B: their image features (and so the fused prompt tokens) are "
                   "interpolated. 'single' renders one factor; 'sequence' renders frames from A (0) to B (1) in one "
                   "run, one image per factor with the same noise — feed the images to an animated preview.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SUBJECTS_TYPE, "LATENT", "STRING")
    RETURN_NAMES = ("subjects", "latent", "factors")
    OUTPUT_TOOLTIPS = ("The morphed subject(s), for MoA Apply.",
                       "The input latent once per factor, all with the same noise: connect it to the sampler.",
                       "The factors rendered, in batch order.")
    FUNCTION = "morph"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "subject_a": (SUBJECTS_TYPE, {"tooltip": "Subject(s) at factor 0 (from MoA Subject). Its class word and "
                                                     "region are used."}),
            "subject_b": (SUBJECTS_TYPE, {"tooltip": "Subject(s) at factor 1; as many as in subject_a (the n-th "
                                                     "morphs into the n-th)."}),
            "latent": ("LATENT", {"tooltip": "The latent to sample (e.g. Empty Latent Image, batch size 1); it is "
                                             "repeated once per factor."}),
            "mode": (list(MODES), {"default": "single", "tooltip": "single: one image at 'factor'. sequence: "
                                                                   "'frames' images from 0 to 1."}),
            "factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                 "tooltip": "single mode: 0 = subject A, 1 = subject B."}),
            "frames": ("INT", {"default": 8, "min": 2, "max": MAX_FRAMES,
                               "tooltip": "sequence mode: how many images, evenly from A (0) to B (1)."}),
        }}

    def morph(self, subject_a, subject_b, latent, mode, factor, frames):
        if not subject_a or not subject_b:
            raise refuse(NODE, "subject_a and subject_b each need a MoA Subject connected")
        if len(subject_a) != len(subject_b):
            raise refuse(NODE, f"mismatched subjects: subject_a has {len(subject_a)} subject(s), subject_b "
                               f"{len(subject_b)}. Chain as many MoA Subject nodes into each (the n-th morphs into "
                               f"the n-th)")
        if any(s.morph_to is not None for s in list(subject_a) + list(subject_b)):
            raise refuse(NODE, "a subject is already a morph; morph plain MoA Subject outputs")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
            raise refuse(NODE, "latent is not an image latent. Connect Empty Latent Image or VAE Encode")
        with refusals(NODE):
            factors = check_factors([factor]) if mode == "single" else sequence_factors(int(frames))
        subjects = [dataclasses.replace(a, morph_to=b, factors=factors) for a, b in zip(subject_a, subject_b)]
        text = ", ".join(f"{f:.3g}" for f in factors)
        return (subjects, same_noise_batch(latent, len(factors)), text)
