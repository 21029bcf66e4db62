"""The Matryoshka loss: encode the image once, then one LM pass per budget.

    pixels -> tower (frozen; features optionally cached) -> projector -> grid [B, N, D]
           -> model.visual_tokens(grid, budgets) (pyramid + visual norm) -> {T: [B, T, D]}
           -> per budget: LM over the prompt with T visual tokens -> summed CE on targets

loss = mean over the step's budgets of (sum of target CE / number of target tokens), i.e.
exactly the mean of the per-budget losses that `model(..., labels=...)` computes, but the
tower and projector run once instead of once per budget (the authors' way), and logits
are computed only where there is a label.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmvr.tokenizer import IGNORE_INDEX
from train.data import Batch


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's grid features (fmvr.towers protocol): [B, N, Dv]."""
    return model.vision_tower(pixel_values)  # [B, N, Dv]


class VisionCache:
    """Tower features by image key, kept in memory (valid only while the tower is frozen
    and images are not augmented: the trainer enforces both)."""

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def features(self, model, batch: Batch) -> torch.Tensor:
        """Cached features of the batch's images; computes (and keeps) those it brings pixels for."""
        if batch.pixel_values is not None:
            keys = batch.pixel_keys if batch.pixel_keys is not None else batch.keys
            # float32 even inside a bf16 step: the frozen tower's bf16 features are ~10 % off the
            # float32 ones the exported graph computes, and the projector would learn that offset
            px = batch.pixel_values
            with torch.no_grad(), torch.autocast(px.device.type, enabled=False):
                feats = tower_features(model, px.float())  # [P, N, Dv]
            for k, f in zip(keys, feats):
                self.store[k] = f.clone()
        missing = [k for k in batch.keys if k not in self.store]
        if missing:
            raise ValueError(f"no pixels and no cached features for {missing[:3]}")
        return torch.stack([self.store[k] for k in batch.keys])  # [B, N, Dv]


def lm_loss_sum(
    model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor
) -> torch.Tensor:
    """Summed shifted CE over target tokens, logits only at target positions."""
    lm = model.language_model
    embeds = model.embed(ids, feats)  # [B, S, D]
    # A [B,1,S,S] block mask (independent questions sharing the image): a token's position is
    # the number of tokens it sees, minus one, i.e. its position in its own single-question prompt.
    pos = (mask.sum(-1)[:, 0] - 1) if mask.ndim == 4 else None  # [B, S]
    hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    shifted = labels[:, 1:]  # [B, S-1]
    keep = shifted != IGNORE_INDEX  # [B, S-1]
    h = hidden[:, :-1][keep]  # [K, D]
    logits = lm.get_output_embeddings()(h)  # [K, V]
    return F.cross_entropy(logits.float(), shifted[keep], reduction="sum")


def step_budgets(budgets: Sequence[int], mode: str, rng: random.Random | None = None) -> tuple[int, ...]:
    """All budgets ("mean", the authors' code) or one random budget ("random", the paper's figure)."""
    if mode == "mean":
        return tuple(budgets)
    if mode == "random":
        if rng is None:
            raise ValueError("budget mode 'random' needs an rng shared by all ranks")
        return (rng.choice(list(budgets)),)
    raise ValueError(f"unknown budget mode {mode!r}; choose mean or random")


class MatryoshkaStep(nn.Module):
    """Wraps the model so that DDP sees one forward: returns the summed-CE loss of a
    micro-batch divided by `normaliser` (global target tokens), averaged over budgets."""

    def __init__(self, model, cache: VisionCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def grid(self, batch: Batch) -> torch.Tensor:
        m = self.model
        if self.cache is not None:
            feats = self.cache.features(m, batch)  # [B, N, Dv]
        else:
            if batch.pixel_values is None:
                raise ValueError("batch holds no pixels and no vision cache is set")
            feats = tower_features(m, batch.pixel_values)  # [B, N, Dv]
        return m.projector(feats)  # [B, N, D]

    def forward(
        self, batch: Batch, budgets: tuple[int, ...], normaliser: float
    ) -> tuple[torch.Tensor, dict[int, float]]:
        grid = self.grid(batch)  # [B, N, D]
        visual = self.model.visual_tokens(grid, budgets)  # {T: [B, T, D]}
        total = grid.new_zeros(())
        parts: dict[int, float] = {}
        for t in budgets:
            ids, mask, labels = batch.per_budget[t]
            part = lm_loss_sum(self.model, ids, mask, labels, visual[t]) / normaliser
            parts[t] = float(part.detach())
            total = total + part
        return total / len(budgets), parts


def matryoshka_loss(model, batch: Batch, budgets: Sequence[int]) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over budgets of the per-budget token-mean losses of one batch (encode once)."""
    return MatryoshkaStep(model)(batch, tuple(budgets), float(batch.num_targets()))


def separate_losses(model, batch: Batch, budgets: Sequence[int]) -> dict[int, torch.Tensor]:
    """Reference: one full model forward per budget (the authors' way), HF's own loss."""
    out = {}
    for t in budgets:
        ids, mask, labels = batch.per_budget[t]
        out[t] = model(
            input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values, tokens=t, labels=labels
        ).loss
    return out
