"""The personalized expert: its own q/k/v/out projections beside the frozen prior's.

Two storage modes with the same math:
- "full": independent copies of the four projections (largest files, most capacity);
- "lowrank": a rank-r delta on the prior's projections, W_personal = W_prior + up @ down.
  It reuses the prior's projection results where the input is the same (attn1 q/k/v and the
  q of attn2), so the expert costs only its small delta there.
"""
from __future__ import annotations

import torch
from torch import nn

from .casting import linear
from .errors import MoAInputError

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
EXPERT_MODES = ("full", "lowrank")


class LowRankDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.down), self.up)


class PersonalExpert(nn.Module):
    """Projections of one attention layer's personalized branch.

    `dims` maps each projection to (in_features, out_features) of the prior layer.
    """

    def __init__(self, dims: dict[str, tuple[int, int]], mode: str = "lowrank", rank: int = 64) -> None:
        super().__init__()
        if mode not in EXPERT_MODES:
            raise MoAInputError(f"expert mode must be one of {EXPERT_MODES}, got {mode!r}")
        self.mode = mode
        self.rank = rank if mode == "lowrank" else 0
        self.proj = nn.ModuleDict()
        for name in PROJECTIONS:
            fin, fout = dims[name]
            if mode == "full":
                self.proj[name] = nn.Linear(fin, fout, bias=(name == "to_out"))
            else:
                self.proj[name] = LowRankDelta(fin, fout, min(rank, fin, fout))

    @torch.no_grad()
    def reset_fresh(self, prior: dict[str, nn.Linear], generator: torch.Generator | None = None) -> None:
        """Personal == prior: full copies the prior weights, lowrank starts with a zero delta."""
        for name in PROJECTIONS:
            p = self.proj[name]
            if self.mode == "full":
                p.weight.copy_(prior[name].weight.detach().float())
                if p.bias is not None:
                    p.bias.copy_(prior[name].bias.detach().float())
            else:
                p.down.weight.normal_(0.0, p.down.in_features ** -0.5, generator=generator)
                p.up.weight.zero_()

    def project(self, name: str, x: torch.Tensor, prior: nn.Module,
                prior_result: torch.Tensor | None = None) -> torch.Tensor:
        """Personalized projection `name` of x; `prior_result` is prior(x) when already known."""
        p = self.proj[name]
        if self.mode == "full":
            return linear(x, p)
        base = prior_result if prior_result is not None else prior(x)
        return base + p(x)

    def project_rows(self, name: str, x: torch.Tensor, prior: nn.Module,
                     batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """project(name, x) for the rows `rows` of a batch whose prior input is `batch`, with the
        weight matmul run on the batch's shape (x written into those rows). Half-precision CPU
        matmuls split their sums by matrix shape, so the same rows projected as a smaller batch
        can differ in the last bit; on the prior's shape an expert equal to the prior gives the
        prior's result exactly. The low-rank delta only ever adds to it."""
        if x.shape[1:] != batch.shape[1:] or x.shape == batch.shape:
            return self.project(name, x, prior)
        full = batch.index_copy(0, rows, x.to(batch.dtype))
        if self.mode == "full":
            return linear(full, self.proj[name])[rows]
        return prior(full)[rows] + self.proj[name](x)
