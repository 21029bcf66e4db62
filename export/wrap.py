"""Torch modules traced for export.

VisionExport: CLIP tower + projector + pyramid, pixels [B,3,S,S] -> one tensor per budget,
named `tokens_<T>` in the ONNX graph. One budget (per-budget layout) or several outputs
from one trunk (shared layout: the tower and projector run once).
"""

from __future__ import annotations

import torch
from torch import nn

from fmvr.model import FMVRLlava

INPUT_NAME = "pixel_values"


def output_name(tokens: int) -> str:
    return f"tokens_{tokens}"


class VisionExport(nn.Module):
    """pixels [B,3,S,S] -> tuple of [B,T,D], one per budget in `budgets` (order kept)."""

    def __init__(self, model: FMVRLlava, budgets: tuple[int, ...]) -> None:
        super().__init__()
        if not budgets:
            raise ValueError("VisionExport needs at least one budget")
        for t in budgets:
            model.cfg.check_budget(t)
        self.model = model
        self.budgets = tuple(budgets)

    @property
    def output_names(self) -> list[str]:
        return [output_name(t) for t in self.budgets]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.encode_budgets(pixel_values, self.budgets)  # {T: [B, T, D]}
        return tuple(feats[t] for t in self.budgets)


class DecoderExport(nn.Module):
    """The causal LM over inputs_embeds + a flat KV cache, for ONNX.

    forward(inputs_embeds [B,S,H], attention_mask [B,P+S], past) with past a tuple of
    (key, value) pairs, each [B, kv_heads, P, head_dim]; returns (logits [B,S,V], key_0,
    value_0, key_1, ...) with the present cache [B, kv_heads, P+S, head_dim].
    """

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.lm = language_model

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    ) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.lm.config)  # type: ignore[arg-type]
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        s = inputs_embeds.shape[1]
        # Positions count attended tokens only (left padding allowed), as transformers' generate does.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]  # [B, S]
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in range(len(past)):
            k, v = _layer_kv(out.past_key_values, layer)
            present += [k, v]
        return (out.logits, *present)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) [B, kv_heads, S, head_dim] of one layer of a transformers cache."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]
