"""The MoA attention layer: frozen prior + personalized expert, mixed per pixel by a router.

    out = prior + share * (personal - prior)

is the spec's r_prior * prior + r_personal * personal with r_prior = 1 - share, written so
that share == 0 or personal == prior gives the prior bit for bit (the two-product form is
off by ~1e-4 in fp32 because r_prior + r_personal != 1 after rounding). For personal to equal
prior bit for bit when the expert equals the prior, the expert reuses the prior's projection
results or runs the prior's weights on the prior's shapes (half-precision CPU matmuls round by
shape): the personalized rows of a batch are not projected as a smaller batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.profiler import record_function

from .adapter import MoALayerWeights
from .attention_fn import sdpa_attention
from .call_state import STATE_KEY, CallState, LayerEvent
from .errors import MoAInputError
from .router import apply_strength, hard_route
from .unet_layers import get_submodule

AttentionFn = Callable[..., torch.Tensor]


class MoAAttention(nn.Module):
    """Drop-in replacement for one ComfyUI CrossAttention module.

    The prior's to_q/to_k/to_v/to_out are registered here first and under their usual names:
    ComfyUI applies LoRAs by walking named_modules() (first name wins), other packs'
    attention-replace patches call these attributes directly, and both must keep finding the
    prior's own layers. The adapter weights are deliberately *not* registered: they live in
    the adapter's own ModelPatcher, so ComfyUI loads/offloads them as one model and the
    UNet's module tree and state dict stay what they were.
    """

    def __init__(self, prior: nn.Module, weights: MoALayerWeights, path: str,
                 attention: AttentionFn = sdpa_attention) -> None:
        super().__init__()
        self.to_q = prior.to_q
        self.to_k = prior.to_k
        self.to_v = prior.to_v
        self.to_out = prior.to_out
        self.heads = prior.heads
        self.dim_head = getattr(prior, "dim_head", prior.to_q.out_features // prior.heads)
        self.attn_precision = getattr(prior, "attn_precision", None)
        self.path = path
        self.kind = path.rsplit(".", 1)[-1]
        object.__setattr__(self, "prior_module", prior)
        object.__setattr__(self, "moa", weights)
        object.__setattr__(self, "attention", attention)

    def _attend(self, q, k, v, mask, transformer_options):
        return self.attention(q, k, v, self.heads, mask=mask, attn_precision=self.attn_precision,
                              transformer_options=transformer_options)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: dict = {}) -> torch.Tensor:  # noqa: B006 (ComfyUI's signature)
        with record_function("moa.layer"):
            # the prior, computed exactly as CrossAttention.forward computes it
            q = self.to_q(x)
            ctx = x if context is None else context
            k = self.to_k(ctx)
            v = self.to_v(value if value is not None else ctx)
            state: CallState | None = transformer_options.get(STATE_KEY)
            if state is not None and mask is None and state.settings.hard:
                return self.hard_mix(x, q, k, v, state, transformer_options, ctx, value)
            prior_attn = self._attend(q, k, v, mask, transformer_options)
            prior_out = self.to_out(prior_attn)
            if state is None or mask is not None:
                return prior_out
            return self.mix(x, q, k, v, (prior_attn, prior_out), state, transformer_options, ctx, value)

    def routed_share(self, x: torch.Tensor, state: CallState,
                     transformer_options: dict) -> tuple[torch.Tensor, tuple[int, int]]:
        """[R, N, 1] personalized share of the personalized rows (strength, region, routing
        applied), and the layer's token grid."""
        with record_function("moa.router"):
            hw = state.grid(x.shape[1], transformer_options)
            share = apply_strength(self.moa.router(x[state.rows]), state.settings.strength)
            region = state.region_at(*hw, like=x)
            if region is not None:
                share = share * region
            if state.settings.hard:
                share = hard_route(share)
        return share, hw

    def personal_kv(self, x, k, v, state: CallState, context=None, value=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Personalized keys/values of the personalized rows: attn1 attends to what the prior
        attended to (x, or what another pack's attn1 patch made of it), attn2 to the
        multimodal prompt: one (key, value) pair, or one per subject when subjects have their
        own regions (each subject's prompt fuses only that subject's tokens), projected on the
        prior's context shape (see PersonalExpert.project_rows)."""
        rows, expert = state.rows, self.moa.expert
        if self.kind == "attn1":
            kctx = x[rows] if context is None else context[rows]
            vctx = kctx if value is None else value[rows]
            return [(expert.project("to_k", kctx, self.to_k, k[rows]),
                     expert.project("to_v", vctx, self.to_v, v[rows]))]
        contexts = ([state.personal_context] if state.subject_contexts is None
                    else list(state.subject_contexts.unbind(1)))
        if self.moa.schedule is not None:
            contexts = self.scheduled(contexts, context[rows], state)
        vctx = context if value is None else value
        return [(expert.project_rows("to_k", c.to(x.dtype), self.to_k, context, rows),
                 expert.project_rows("to_v", c.to(x.dtype), self.to_v, vctx, rows)) for c in contexts]

    def scheduled(self, personals: list[torch.Tensor], plain: torch.Tensor, state: CallState) -> list[torch.Tensor]:
        """The fused prompts as this layer sees them at this call's timesteps (prompt_schedule.py)."""
        if state.timesteps is None:
            raise MoAInputError("this MoA adapter's prompt depends on the timestep, but the caller did not say "
                                "which timestep the UNet runs at: set CallState.timesteps")
        return self.moa.schedule.apply_each(personals, plain.to(personals[0].dtype), state.timesteps, self.moa.index)

    def subject_weights(self, state: CallState, hw: tuple[int, int], like: torch.Tensor):
        """[R, S, N, 1] per-subject pixel weights when the personalized attention has one
        context per subject, else None."""
        if self.kind != "attn2" or state.subject_contexts is None:
            return None
        return state.subject_weights_at(*hw, like=like)

    def personal_attention(self, qp, kvs: list, weights: torch.Tensor | None, transformer_options: dict):
        """The personalized expert's attention output (before to_out). With per-subject contexts,
        each pixel takes the attention over its own subject's prompt: a pixel of subject A's
        region never sees subject B's fused tokens (its weight for B is exactly 0)."""
        if weights is None:
            kp, vp = kvs[0]
            return self._attend(qp, kp, vp, None, transformer_options)
        out = None
        for s, (kp, vp) in enumerate(kvs):
            a = self._attend(qp, kp, vp, None, transformer_options) * weights[:, s].to(qp.dtype)
            out = a if out is None else out + a
        return out

    def hard_mix(self, x, q, k, v, state: CallState, transformer_options: dict, context=None, value=None):
        """Top-1 routing: each pixel is computed by one expert only. The prior's attention is
        skipped for the pixels routed to the subject, the expert's for all the others; both
        attentions then go through the prior's to_out in one call of the prior's shape, and the
        expert's to_out delta is added on its pixels."""
        rows = state.rows
        share, hw = self.routed_share(x, state, transformer_options)
        if state.observers:
            state.notify(LayerEvent(self.path, self.kind, share, hw, state, heads=self.heads))
        personalized = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        personalized[rows] = True
        attn = torch.empty_like(q)
        others = (~personalized).nonzero().squeeze(1)
        if others.numel():
            attn[others] = self._attend(q[others], k[others], v[others], None, transformer_options)
        selected = []
        for i, r in enumerate(rows.tolist()):
            sel = share[i, :, 0] > 0
            keep = (~sel).nonzero().squeeze(1)
            if keep.numel():
                attn[r, keep] = self._attend(q[r:r + 1, keep], k[r:r + 1], v[r:r + 1], None, transformer_options)[0]
            selected.append(sel.nonzero().squeeze(1))
        if not any(s.numel() for s in selected):
            return self.to_out(attn)
        personal_attn = self.hard_personal_attention(x, q, k, v, state, hw, selected, transformer_options, context, value)
        for r, sel, a in personal_attn:
            attn[r, sel] = a[0].to(attn.dtype)
        out = self.to_out(attn)
        to_out = self.to_out[0] if isinstance(self.to_out, nn.Sequential) else self.to_out
        for r, sel, a in personal_attn:
            with record_function("moa.expert"):
                personal = self.moa.expert.project("to_out", a, to_out, out[r:r + 1, sel])[0]
            with record_function("moa.mix"):
                out[r, sel] = personal.to(out.dtype)
        return out

    def hard_personal_attention(self, x, q, k, v, state: CallState, hw, selected: list, transformer_options: dict,
                                context=None, value=None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(row, pixels, the expert's attention output [1, P, C] there) for each personalized row
        that has pixels routed to the expert."""
        with record_function("moa.expert"):
            kvs = self.personal_kv(x, k, v, state, context, value)
            weights = self.subject_weights(state, hw, x)
        expert, found = self.moa.expert, []
        for i, r in enumerate(state.rows.tolist()):
            sel = selected[i]
            if sel.numel() == 0:
                continue
            with record_function("moa.expert"):
                qp = expert.project("to_q", x[r].index_select(0, sel)[None], self.to_q,
                                    q[r].index_select(0, sel)[None])
                found.append((r, sel, self.personal_attention(
                    qp, [(kp[i:i + 1], vp[i:i + 1]) for kp, vp in kvs],
                    None if weights is None else weights[i:i + 1, :, sel], transformer_options)))
        return found

    def mix(self, x, q, k, v, prior: tuple[torch.Tensor, torch.Tensor], state: CallState, transformer_options: dict,
            context: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """Soft routing: the personalized branch for the rows that carry a subject, blended in
        per pixel by the router's share. `prior` is the prior's (attention, to_out) output."""
        if state.settings.sparse_threshold > 0:
            return self.sparse_mix(x, q, k, v, prior[1], state, transformer_options, context, value)
        rows = state.rows
        prior_attn, prior_out = prior
        prior_r = prior_out[rows]
        share, hw = self.routed_share(x, state, transformer_options)
        with record_function("moa.expert"):
            kvs = self.personal_kv(x, k, v, state, context, value)
            expert = self.moa.expert
            to_out = self.to_out[0] if isinstance(self.to_out, nn.Sequential) else self.to_out
            qp = expert.project("to_q", x[rows], self.to_q, q[rows])
            attn = self.personal_attention(qp, kvs, self.subject_weights(state, hw, x), transformer_options)
            personal = expert.project_rows("to_out", attn, to_out, prior_attn, rows)
        with record_function("moa.mix"):
            mixed = prior_r + share.to(prior_r.dtype) * (personal - prior_r)
            out = prior_out.index_copy(0, rows, mixed)
        if state.observers:
            state.notify(LayerEvent(self.path, self.kind, share, hw, state, qp, kvs[0][0], self.heads))
        return out

    def sparse_mix(self, x, q, k, v, prior_out: torch.Tensor, state: CallState, transformer_options: dict,
                   context: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """Soft routing with the personalized expert computed only for the pixels whose share is
        above settings.sparse_threshold (its queries for those pixels, its keys/values from all
        pixels, through hard routing's gather); the other pixels keep the prior's output exactly:
        their share counts as 0. The mix is written into `prior_out` in place (the layer's own
        to_out result, nobody else holds it), so only the selected pixels are copied, not the
        whole output. Against `mix`, a skipped pixel with share s differs by
        s * (personal - prior), so by at most sparse_threshold * |personal - prior|; a computed
        pixel differs only by float rounding (its to_out runs on the selected pixels' shape)."""
        share, hw = self.routed_share(x, state, transformer_options)
        share = share.masked_fill(share <= state.settings.sparse_threshold, 0.0)
        if state.observers:
            state.notify(LayerEvent(self.path, self.kind, share, hw, state, heads=self.heads))
        selected = [(share[i, :, 0] > 0).nonzero().squeeze(1) for i in range(share.shape[0])]
        if not any(s.numel() for s in selected):
            return prior_out
        found = self.hard_personal_attention(x, q, k, v, state, hw, selected, transformer_options, context, value)
        to_out = self.to_out[0] if isinstance(self.to_out, nn.Sequential) else self.to_out
        index = {r: i for i, r in enumerate(state.rows.tolist())}
        for r, sel, a in found:
            with record_function("moa.expert"):
                personal = self.moa.expert.project("to_out", a, to_out)[0]
            with record_function("moa.mix"):
                row = prior_out[r]
                prior_sel = row.index_select(0, sel)
                s = share[index[r]].index_select(0, sel).to(prior_sel.dtype)
                row.index_copy_(0, sel, prior_sel + s * (personal.to(prior_sel.dtype) - prior_sel))
        return prior_out


def install_layers(diffusion_model: nn.Module, adapter, attention: AttentionFn = sdpa_attention):
    """Swap MoA layers into a bare diffusion model (the trainer's path; ComfyUI's goes through
    the ComfyUI layer's patch on a ModelPatcher clone). Returns a function that puts the
    originals back."""
    swapped = []
    for spec in adapter.config.layers:
        parent_path, name = spec.path.rsplit(".", 1)
        parent = get_submodule(diffusion_model, parent_path)
        original = getattr(parent, name)
        setattr(parent, name, MoAAttention(original, adapter.layer(spec.path), spec.path, attention))
        swapped.append((parent, name, original))

    def uninstall() -> None:
        for parent, name, original in swapped:
            setattr(parent, name, original)
    return uninstall


@contextmanager
def moa_layers(diffusion_model: nn.Module, adapter, attention: AttentionFn = sdpa_attention) -> Iterator[None]:
    """install_layers for a `with` block: the original attention modules are back however the
    block ends (its last line, an exception, Ctrl-C)."""
    uninstall = install_layers(diffusion_model, adapter, attention)
    try:
        yield
    finally:
        uninstall()
