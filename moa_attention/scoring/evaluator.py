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


#: one metric group: (picture, its image [H, W, 3], its subject mask or None) -> {metric: value}
Step = Callable[[Picture, torch.Tensor, "torch.Tensor | None"], dict]


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
        image = p.image[..., :3].float()
        mask = _fitting_mask(p.mask, image, errors)
        for name, wanted, compute in self._steps(p):
            if not wanted:
                continue
            try:
                out.update(compute(p, image, mask))
            except Exception as e:        # noqa: BLE001 - one metric's failure must not cost the others
                errors.append(f"{name}: {e}")
        out["errors"] = errors
        return out

    def _steps(self, p: Picture) -> tuple[tuple[str, bool, Step], ...]:
        """(name in the errors, whether the picture and the evaluator have what it needs, the step)."""
        refs = p.references is not None
        return (("identity (ArcFace)", refs and self.face_embedding is not None, self._face_identity),
                ("identity (CLIP)", refs and self.subject_embedding is not None, self._subject_identity),
                ("prompt (CLIP)", bool(p.prompt) and self.prompt_score is not None, self._prompt),
                ("context", p.baseline is not None, _context),
                ("latent context", p.latent is not None and p.baseline_latent is not None, _latent_context),
                ("router", p.router_map is not None, _router))

    def _face_identity(self, p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
        """Cosine of the picture's ArcFace embedding with the references' normalised mean."""
        def unit(picture: torch.Tensor, box, label: str) -> torch.Tensor:
            return F.normalize(self.face_embedding(picture, box, label).float(), dim=0)

        refs = p.references
        ref = self._reference("face", p, lambda: F.normalize(torch.stack([
            unit(refs[i], p.reference_face_box, f"reference {i + 1}") for i in range(refs.shape[0])]).mean(0), dim=0))
        return {"identity_arcface": float((ref @ unit(image, p.face_box, "picture")).clamp(-1, 1))}

    def _subject_identity(self, p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
        """Cosine of the CLIP embeddings of the masked subject crops, references vs picture."""
        ref = self._reference("clip", p, lambda: self.subject_embedding(p.references, p.reference_masks, "reference"))
        emb = self.subject_embedding(image[None], None if mask is None else mask[None], "picture")
        return {"identity_clip": F.cosine_similarity(ref.float(), emb.float(), dim=0).item()}

    def _prompt(self, p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
        return {"prompt_clip": float(self.prompt_score(image, p.prompt))}


def _fitting_mask(mask: torch.Tensor | None, image: torch.Tensor, errors: list[str]) -> torch.Tensor | None:
    """The subject mask when it has the picture's size; else None and the reason in `errors`."""
    h, w = image.shape[:2]
    if mask is not None and tuple(mask.shape[-2:]) != (h, w):
        errors.append(f"mask: its size {mask.shape[-1]}x{mask.shape[-2]} differs from the picture's {w}x{h}")
        return None
    return mask


def _needs_mask(mask: torch.Tensor | None, what: str) -> torch.Tensor:
    if mask is None:
        raise ValueError(f"needs the subject mask {what}")
    return mask.float()


def _context(p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """Change, PSNR and SSIM against the baseline, inside and outside the subject."""
    base = p.baseline[..., :3].float()
    if base.shape != image.shape:
        raise ValueError(f"the baseline is {base.shape[1]}x{base.shape[0]} but the picture is "
                         f"{image.shape[1]}x{image.shape[0]}: compare pictures of one size (same seed and resolution)")
    m = _needs_mask(mask, "(where the subject is) to split inside from outside")
    return context_preservation(base[None], image[None], m).as_dict()


def _latent_context(p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """The same change on the sampler's latents, free of the VAE's decoding."""
    lat, base = p.latent.float(), p.baseline_latent.float()
    if lat.shape != base.shape:
        raise ValueError(f"the baseline latent has shape {list(base.shape)}, the picture's "
                         f"{list(lat.shape)}: compare latents of one size")
    m = _needs_mask(mask, "(resized to the latent) to split inside from outside")
    c = context_preservation(base[None], lat[None], m, peak=None)
    return {"latent_change_inside": c.change_inside, "latent_change_outside": c.change_outside}


def _router(p: Picture, image: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """The router's personalized share on the subject and on the background."""
    m = _needs_mask(mask, "to split the router's share into subject and background")
    return {f"router_{k}": v for k, v in router_shares(p.router_map.float(), m).as_dict().items()}
