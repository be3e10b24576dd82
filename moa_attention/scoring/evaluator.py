"""One picture's evaluation numbers, the same for MoA Evaluate and `python -m moa_attention.evaluate`.

Scoring knows no face or CLIP model: the caller hands in the embedding functions (built from
faces/identity.py and comfyui/clip_scores.py), and this module does the rest — reference
embeddings (cached), cosines, context preservation against the baseline, the router's shares —
and records every metric that cannot be computed as a per-picture error while the others still
get their numbers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from .metrics import context_preservation, router_shares
from .report import METRIC_KEYS

FaceEmbedding = Callable[[torch.Tensor, "list[float] | None", str], torch.Tensor]      # image [H, W, 3], box, label -> [D]
SubjectEmbedding = Callable[[torch.Tensor, "torch.Tensor | None", str], torch.Tensor]  # images [N, H, W, 3], masks -> [D]
PromptScore = Callable[[torch.Tensor, str], float]                                     # image [H, W, 3], prompt -> cosine


@dataclass
class Picture:
    """One generated picture and what it is compared with (all optional but the image)."""
    image: torch.Tensor                              # [H, W, 3] in [0, 1]
    label: str = "picture"
    baseline: torch.Tensor | None = None             # [H, W, 3]: same seed without the subject / strength 0
    mask: torch.Tensor | None = None                 # [H, W]: 1 = the subject in this picture
    router_map: torch.Tensor | None = None           # [h, w]: MoA Router Maps' personalized share
    prompt: str | None = None
    face_box: list[float] | None = None              # x0, y0, x1, y1 of the face to score in the picture
    references: torch.Tensor | None = None           # [N, H, W, 3] photos of the subject
    reference_masks: torch.Tensor | None = None      # [N, H, W]
    reference_face_box: list[float] | None = None
    reference_key: object = None                     # equal keys share one reference embedding
    latent: torch.Tensor | None = None               # [C, h, w]: the sampler's output for the picture
    baseline_latent: torch.Tensor | None = None      # [C, h, w]: the baseline's


@dataclass
class Evaluator:
    face_embedding: FaceEmbedding | None = None
    subject_embedding: SubjectEmbedding | None = None
    prompt_score: PromptScore | None = None
    _refs: dict = field(default_factory=dict)

    def _reference(self, kind: str, p: Picture, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (kind, p.reference_key if p.reference_key is not None else id(p.references))
        if key not in self._refs:
            try:
                self._refs[key] = make()
            except Exception as e:        # noqa: BLE001 - remembered, so every row using it says the same
                self._refs[key] = e
        hit = self._refs[key]
        if isinstance(hit, Exception):
            raise hit
        return hit

    def score(self, p: Picture) -> dict:
        """{metric: value} for every metric in report.METRICS (NaN where not computed) plus
        "errors": the reasons, one line per metric that was asked for but could not be computed."""
        out: dict = {k: float("nan") for k in METRIC_KEYS}
        errors: list[str] = []

        def attempt(name: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as e:        # noqa: BLE001 - one metric's failure must not cost the others
                errors.append(f"{name}: {e}")

        image = p.image[..., :3].float()
        h, w = image.shape[:2]
        mask = p.mask
        if mask is not None and tuple(mask.shape[-2:]) != (h, w):
            errors.append(f"mask: its size {mask.shape[-1]}x{mask.shape[-2]} differs from the picture's {w}x{h}")
            mask = None

        if p.references is not None and self.face_embedding is not None:
            def face():
                refs = p.references
                ref = self._reference("face", p, lambda: F.normalize(torch.stack([
                    F.normalize(self.face_embedding(refs[i], p.reference_face_box, f"reference {i + 1}").float(), dim=0)
                    for i in range(refs.shape[0])]).mean(0), dim=0))
                emb = F.normalize(self.face_embedding(image, p.face_box, "picture").float(), dim=0)
                out["identity_arcface"] = float((ref @ emb).clamp(-1, 1))
            attempt("identity (ArcFace)", face)

        if p.references is not None and self.subject_embedding is not None:
            def subject():
                ref = self._reference("clip", p, lambda: self.subject_embedding(p.references, p.reference_masks,
                                                                                  "reference"))
                emb = self.subject_embedding(image[None], None if mask is None else mask[None], "picture")
                out["identity_clip"] = F.cosine_similarity(ref.float(), emb.float(), dim=0).item()
            attempt("identity (CLIP)", subject)

        if p.prompt and self.prompt_score is not None:
            def prompt():
                out["prompt_clip"] = float(self.prompt_score(image, p.prompt))
            attempt("prompt (CLIP)", prompt)

        if p.baseline is not None:
            def context():
                base = p.baseline[..., :3].float()
                if base.shape != image.shape:
                    raise ValueError(f"the baseline is {base.shape[1]}x{base.shape[0]} but the picture is {w}x{h}: "
                                     f"compare pictures of one size (same seed and resolution)")
                if mask is None:
                    raise ValueError("needs the subject mask (where the subject is) to split inside from outside")
                out.update(context_preservation(base[None], image[None], mask.float()).as_dict())
            attempt("context", context)

        if p.latent is not None and p.baseline_latent is not None:
            def latent_context():
                lat, base = p.latent.float(), p.baseline_latent.float()
                if lat.shape != base.shape:
                    raise ValueError(f"the baseline latent has shape {list(base.shape)}, the picture's "
                                     f"{list(lat.shape)}: compare latents of one size")
                if mask is None:
                    raise ValueError("needs the subject mask (resized to the latent) to split inside from outside")
                c = context_preservation(base[None], lat[None], mask.float(), peak=None)
                out["latent_change_inside"], out["latent_change_outside"] = c.change_inside, c.change_outside
            attempt("latent context", latent_context)

        if p.router_map is not None:
            def router():
                if mask is None:
                    raise ValueError("needs the subject mask to split the router's share into subject and background")
                out.update({f"router_{k}": v for k, v in router_shares(p.router_map.float(), mask.float()).as_dict().items()})
            attempt("router", router)

        out["errors"] = errors
        return out
