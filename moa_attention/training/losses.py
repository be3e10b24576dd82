"""MoA's training losses (the spec; why each: docs/training.md): denoising, router, subject
routing, object and background-effect loss, and the experimental x0-unit terms.

Every loss is a mean over the batch of a per-example value, so data-parallel ranks with batch b
(DDP averages their gradients) train exactly like one process with batch N*b."""
from __future__ import annotations

import torch

from ..engine.call_state import halving_grid
from ..engine.masks import resize_mask
from .capture import Captured


def masks_at(masks: torch.Tensor, n_tokens: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, S, H, W] latent-resolution masks -> [B, S, n_tokens] at a layer's token grid."""
    return resize_mask(masks, halving_grid(n_tokens, latent_hw)).flatten(2)


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B] per-example weighted mean over the trailing axis ([B, N] each); 0 where weight is 0."""
    return (values * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1e-6)


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, HW] squared difference averaged over channels, in fp32."""
    return ((a.float() - b.float()) ** 2).mean(dim=1).flatten(1)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, subject_masks: torch.Tensor | None = None,
                   subject_weight: float = 1.0) -> torch.Tensor:
    """Epsilon MSE; pixels inside any subject mask count `subject_weight` times (the paper's
    masked diffusion loss, with the background kept at weight 1 so the expert is also held to
    the base model's prediction there)."""
    err = _squared_error(pred, target)
    if subject_masks is None or subject_weight == 1.0:
        return err.mean()
    union = subject_masks.amax(dim=1).flatten(1)                          # [B, HW]
    return _masked_mean(err, 1.0 + (subject_weight - 1.0) * union).mean()


def x0_scale(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """[B] (1 - abar) / abar capped: turns a squared eps error into the squared x0 error.

    eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), so an eps error e is an x0 error of
    e sqrt((1 - abar) / abar). At high noise, where layout, colours and identity are decided, the
    eps loss barely sees them (t=900: 1/70 of the squared x0 error)."""
    a = alphas_cumprod.float()
    return ((1.0 - a) / a).clamp(max=cap)


def subject_x0_loss(pred: torch.Tensor, target: torch.Tensor, subject_masks: torch.Tensor,
                    alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """The subject's denoising error in x0 units (ours, experimental). Identity is decided at high
    noise, where the eps loss barely sees the subject's error, so with the eps loss alone the
    adapter can leave the reference's identity unused."""
    inside = _masked_mean(_squared_error(pred, target), subject_masks.amax(dim=1).flatten(1))
    return (inside * x0_scale(alphas_cumprod, cap)).mean()


def mask_routed_loss(pred: torch.Tensor, target: torch.Tensor, subject_masks: torch.Tensor,
                     alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """The subject's denoising error, weighted max(1, x0 scale), of a forward routed by the
    subject masks (ours). The router starts near the prior, so the expert's gradient is scaled by
    a share near 0 at first and stays small at high noise, where the share is lowest and the
    identity is decided; routed by the mask, the expert learns the subject at full share."""
    inside = _masked_mean(_squared_error(pred, target), subject_masks.amax(dim=1).flatten(1))
    return (inside * x0_scale(alphas_cumprod, cap).clamp(min=1.0)).mean()


def background_effect_x0_loss(pred: torch.Tensor, base: torch.Tensor, subject_masks: torch.Tensor,
                              alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """background_effect_loss in x0 units (ours): what the expert changes in the picture the
    sampler is heading for, outside the subjects. The eps-unit term lets a change at high noise
    through almost unpenalised, and that is when the context is laid out."""
    return (_background_change(pred, base, subject_masks) * x0_scale(alphas_cumprod, cap)).mean()


def router_loss(captured: list[Captured], subject_masks: torch.Tensor, latent_hw: tuple[int, int],
                power: float = 1.0) -> torch.Tensor:
    """Mean personalized share on background pixels (outside every subject), over layers.

    power 2 is the paper's ||(1 - M) * (1 - R_prior)||^2 (per pixel, averaged); power 1 (the
    default) keeps pushing a share that is already small, where the square's gradient fades:
    hard routing needs the background share far below 0.5 in every layer, not just on average."""
    terms = []
    for c in captured:
        background = 1.0 - masks_at(subject_masks, c.share.shape[1], latent_hw).amax(dim=1)   # [B, N]
        terms.append(_masked_mean(c.share[..., 0].float().pow(power), background))
    return torch.stack(terms).mean() if terms else subject_masks.new_zeros(())


def subject_route_loss(captured: list[Captured], subject_masks: torch.Tensor, latent_hw: tuple[int, int],
                       eps: float = 1e-4) -> torch.Tensor:
    """-log(personalized share) on the subject's pixels, averaged over layers (ours).

    The paper only penalises the background share; nothing rewards routing the subject to
    the expert, and a penalty on the background alone is met just as well by a share that
    falls everywhere (it then tells subject from background no better than chance, and hard
    routing is the base model). This term makes the share high *and confident* where the
    subject is (hard routing then agrees with soft).
    Pixels count by how much of them the mask covers at the layer's resolution."""
    terms = []
    for c in captured:
        fg = masks_at(subject_masks, c.share.shape[1], latent_hw).amax(dim=1)              # [B, N]
        terms.append(_masked_mean(-torch.log(c.share[..., 0].float().clamp_min(eps)), fg))
    return torch.stack(terms).mean() if terms else subject_masks.new_zeros(())


def background_effect_loss(pred: torch.Tensor, base: torch.Tensor, subject_masks: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the prediction against the frozen base model's, outside every
    subject (ours): the router loss bounds the *share* on the background, but a small share
    times a large expert delta still redraws it; this bounds the *effect*. Costs one extra
    UNet forward without gradient per step."""
    return _background_change(pred, base, subject_masks).mean()


def _background_change(pred: torch.Tensor, base: torch.Tensor, subject_masks: torch.Tensor) -> torch.Tensor:
    """[B] mean squared difference outside every subject."""
    return _masked_mean(_squared_error(pred, base), 1.0 - subject_masks.amax(dim=1).flatten(1))


def object_loss(captured: list[Captured], subject_masks: torch.Tensor, subject_count: list[int],
                latent_hw: tuple[int, int]) -> torch.Tensor:
    """FastComposer's balanced L1: each subject token's cross-attention should sit inside its
    mask: mean attention outside minus mean attention inside; per example the mean over its
    subjects, then over layers and examples."""
    terms = []
    for c in captured:
        maps = c.maps
        n = maps[0][0].shape[0] if maps and maps[0] else 0
        if n == 0:
            continue
        m = masks_at(subject_masks, n, latent_hw)                        # [B, S, N]
        rows = []
        for r, row_maps in enumerate(maps):
            per_subject = []
            for s, attn in enumerate(row_maps[: subject_count[r]]):
                fg, bg = m[r, s], 1.0 - m[r, s]
                per_subject.append((attn * bg).sum() / (bg.sum() + 1e-5) - (attn * fg).sum() / (fg.sum() + 1e-5))
            rows.append(torch.stack(per_subject).mean() if per_subject else m.new_zeros(()))
        terms.append(torch.stack(rows).mean())
    return torch.stack(terms).mean() if terms else subject_masks.new_zeros(())


def background_share(captured: list[Captured], subject_masks: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[float, float]:
    """(mean personalized share outside the subjects, inside them), per example then over the
    batch and the layers: the numbers to watch beside the share's AUROC."""
    bg_terms, fg_terms = [], []
    with torch.no_grad():
        for c in captured:
            union = masks_at(subject_masks, c.share.shape[1], latent_hw).amax(dim=1)
            s = c.share[..., 0].float()
            bg_terms.append(_masked_mean(s, 1 - union).mean().item())
            fg_terms.append(_masked_mean(s, union).mean().item())
    if not bg_terms:
        return float("nan"), float("nan")
    return sum(bg_terms) / len(bg_terms), sum(fg_terms) / len(fg_terms)
