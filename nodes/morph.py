"""MoA Subject Morph: one subject's identity interpolated towards another's."""
from __future__ import annotations

import dataclasses

import torch

from ..moa_attention.engine.morph import check_factors, sequence_factors, sequence_latents
from .common import CATEGORY, SUBJECTS_TYPE, check_finite, refusals, refuse

NODE = "MoA Subject Morph"
MODES = ("single", "sequence")
MAX_FRAMES = 64


class MoASubjectMorph:
    DESCRIPTION = ("Morphs subject A into subject B: their image features (and so the fused prompt tokens) are "
                   "interpolated. 'single' renders one factor; 'sequence' renders frames from A (0) to B (1) in one "
                   "run, one image per factor with the same noise — feed the images to an animated preview. A batch of "
                   "latents gives one sequence per latent, latent after latent (docs/nodes.md).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SUBJECTS_TYPE, "LATENT", "STRING")
    RETURN_NAMES = ("subjects", "latent", "factors")
    OUTPUT_TOOLTIPS = ("The morphed subject(s), for MoA Apply.",
                       "Each input latent once per factor, in a row, with that latent's noise: latents x factors "
                       "pictures (latent 1 at every factor, then latent 2, ...). Connect it to the sampler: a "
                       "sampler given another latent renders no sequence (the console says so).",
                       "The factors of one latent's sequence, in batch order.")
    FUNCTION = "morph"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "subject_a": (SUBJECTS_TYPE, {"tooltip": "Subject(s) at factor 0 (from MoA Subject). Its class word and "
                                                     "region are used."}),
            "subject_b": (SUBJECTS_TYPE, {"tooltip": "Subject(s) at factor 1; as many as in subject_a (the n-th "
                                                     "morphs into the n-th)."}),
            "latent": ("LATENT", {"tooltip": "The latent to sample (e.g. Empty Latent Image). Each latent of a "
                                             "batch is repeated once per factor (one sequence per latent); "
                                             "'single' keeps the batch as it is."}),
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
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise refuse(NODE, "latent is not an image latent. Connect Empty Latent Image or VAE Encode")
        check_finite(NODE, latent=latent)
        with refusals(NODE):
            factors = check_factors([factor]) if mode == "single" else sequence_factors(int(frames))
            out = latent if len(factors) == 1 else sequence_latents(latent, len(factors))
        pictures = int(out["samples"].shape[0])
        subjects = [dataclasses.replace(a, morph_to=b, factors=factors, latent_batch=pictures)
                    for a, b in zip(subject_a, subject_b)]
        text = ", ".join(f"{f:.3g}" for f in factors)
        return (subjects, out, text)
