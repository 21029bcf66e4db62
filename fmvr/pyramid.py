"""The FMVR block and the Matryoshka cascades (FMVR, M3, none).

Input to every cascade is the projected visual grid [B, N, D] (N = G*G tokens in
row-major order); output is [B, T, D] for a budget T of the cascade.

Parameter names map one to one to the authors' release:
    pyramid.stages.<T>.<gap|mp>.<low_weight|high_weight|a|b>
        <-> model.mm_projector_pool_<T>.<gap|mp>.<...>
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmvr.config import FMVRConfig, cascade_sides


class _Branch(nn.Module):
    """Four learnable per-channel tensors [C, 1, 1]; `forward` is the branch's formula."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.low_weight = nn.Parameter(torch.zeros(channels, 1, 1))
        self.high_weight = nn.Parameter(torch.zeros(channels, 1, 1))
        self.a = nn.Parameter(torch.zeros(channels, 1, 1))
        self.b = nn.Parameter(torch.ones(channels, 1, 1))

    def mix(self, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return low * self.low_weight + high * (1 + self.high_weight) + self.a * x * high + self.b * x


class AvgBranch(_Branch):
    """Saliency (global) branch: low = spatial mean, high = x - low; keeps a residual x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, h, w]
        low = x.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        high = x - low  # [B, C, h, w]
        return self.mix(x, low, high) + x


class MaxBranch(_Branch):
    """Anti-saliency (local) branch: high = 3x3 max pool, low = x - high; no residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, h, w]
        high = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # [B, C, h, w]
        low = x - high
        return self.mix(x, low, high)


class FMVRBlock(nn.Module):
    """F(x) = avg_branch(x) + max_branch(x), the released-code form (not an identity at init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gap = AvgBranch(channels)
        self.mp = MaxBranch(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gap(x) + self.mp(x)


def to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, D, G, G] (row-major tokens)."""
    b, n, d = tokens.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"{n} visual tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, d, g, g)  # [B, D, G, G]


def to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h*w, D]."""
    return grid.flatten(2).transpose(1, 2)  # [B, h*w, D]


class Pyramid(nn.Module):
    """The cascade selected by `cfg.pyramid`, generic in the grid side."""

    def __init__(self, cfg: FMVRConfig) -> None:
        super().__init__()
        self.kind = cfg.cascade_kind
        self.grid = cfg.grid
        self.budgets = tuple(cfg.budgets)
        self.sides = cascade_sides(cfg.grid)
        channels = cfg.text.hidden_size
        # FMVR: a stage for every budget made by 2x2 pooling, except the final 1-token mean.
        self.stages = nn.ModuleDict({str(t): FMVRBlock(channels) for t in self.kind.stage_budgets(cfg.grid)})

    def start_as_pooling(self) -> None:
        """Set every FMVR stage to output zero (both branches: high_weight -1 and b -0.5, so the
        average branch gives 0.5x and the max branch -0.5x), so each level starts as plain 2x2
        pooling, as M3's, with the projector's scale at every budget. The released init instead
        scales each level by ~5x (norms 59 / 306 / 1673 / 1e4 at 576 / 144 / 36 / 9 on `small`)."""
        with torch.no_grad():
            for block in self.stages.values():
                for branch in (block.gap, block.mp):
                    branch.high_weight.fill_(-1.0)
                    branch.b.fill_(-0.5)

    def check(self, tokens: int) -> None:
        if tokens not in self.budgets:
            raise ValueError(
                f"{tokens} visual tokens is not a budget of this model ({self.kind.name}); "
                f"valid budgets: {', '.join(map(str, self.budgets))}"
            )

    def forward(self, feats: torch.Tensor, tokens: int) -> torch.Tensor:
        """feats [B, G*G, D] -> [B, tokens, D]."""
        return self.forward_many(feats, (tokens,))[tokens]

    def forward_many(self, feats: torch.Tensor, budgets: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Every requested budget from one pass down the cascade: {T: [B, T, D]}."""
        for t in budgets:
            self.check(t)
        if not self.kind.chained:
            return {t: self._direct(feats, t) for t in budgets}
        out: dict[int, torch.Tensor] = {}
        grid = to_grid(feats)  # [B, D, G, G]
        smallest = min(budgets)
        for side in self.sides:
            t = side * side
            if side != self.grid:
                grid = self._step(grid, t)  # [B, D, side, side]
            if t in budgets:
                out[t] = feats if side == self.grid else to_tokens(grid)
            if t == smallest:
                break
        return out

    def _step(self, grid: torch.Tensor, tokens: int) -> torch.Tensor:
        """One level down the cascade: 2x2 pool (+ FMVR), or the final mean to one token."""
        if grid.shape[-1] % 2:  # odd side: the final step to 1 token, no FMVR
            return grid.mean(dim=(2, 3), keepdim=True)  # [B, D, 1, 1]
        pooled = F.avg_pool2d(grid, kernel_size=2, stride=2)  # [B, D, h/2, w/2]
        if str(tokens) not in self.stages:  # M3-style level (no FMVR stage for this budget)
            return pooled
        return self.stages[str(tokens)](pooled) + pooled

    def _direct(self, feats: torch.Tensor, tokens: int) -> torch.Tensor:
        """M3: pool the full grid directly to sqrt(T) x sqrt(T), no parameters."""
        side = int(round(tokens**0.5))
        if side == self.grid:
            return feats
        k = self.grid // side
        grid = F.avg_pool2d(to_grid(feats), kernel_size=k, stride=k)  # [B, D, side, side]
        return to_tokens(grid)
