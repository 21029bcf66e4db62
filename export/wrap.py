"""Torch modules traced for export.

VisionExport: CLIP tower + projector + pyramid, pixels [B,3,S,S] -> one tensor per budget,
named `tokens_<T>` in the ONNX graph. One budget (per-budget layout) or several outputs
from one trunk (shared layout: the tower and projector run once). FactoredGrid: the same
projected grid for a multi-map tower + LayerNorm projector, with the first Linear applied to
each feature map at its own resolution (fewer FLOPs, no upsampled 1280-channel copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self.grid = FactoredGrid(model) if FactoredGrid.applies(model) else None

    @property
    def output_names(self) -> list[str]:
        return [output_name(t) for t in self.budgets]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.grid is None:
            feats = self.model.encode_budgets(pixel_values, self.budgets)  # {T: [B, T, D]}
        else:
            feats = self.model.visual_tokens(self.grid(pixel_values), self.budgets)
        return tuple(feats[t] for t in self.budgets)


class FactoredGrid(nn.Module):
    """model.encode_grid for a multi-map tower (fmvr.towers: coarse maps repeated k x k onto the
    grid, fixed position channels appended) and the ln_mlp2x_gelu projector, rewritten exactly.

    The projector's first layer on a token x (the concatenation of every map's cell and the
    position channels, C wide) is W (gamma * (x - mu) / s + beta) + b, with mu, s the token's
    mean and std over C. Since W (gamma * x) and the sums behind mu and s split over the maps,
    each map gets its own 1x1 convolution (W's columns for its channels, times gamma) and its
    channel sums (of x, of x^2) at its own resolution, and only those H + 2 channels are
    repeated onto the grid: for `small`, 144 cells x 1280 channels instead of 576 x 1280 in the
    first layer (3.2x fewer of its multiply-adds) and no 576 x 1280 repeated copy. The position
    channels' share is a constant. Same values up to float rounding (variance as E[x^2] - mu^2:
    the export's parity gate measures it)."""

    def __init__(self, model: FMVRLlava) -> None:
        super().__init__()
        tower, proj = model.vision_tower, model.projector
        assert proj.norm is not None and proj.crosslayer is None
        norm, first = proj.norm, proj.mlp[0]
        self.tower, self.rest = tower, proj.mlp[1:]  # GELU, Linear
        self.grid, self.eps, self.width = tower.grid, norm.eps, first.in_features
        w = (first.weight * norm.weight).detach()  # [H, C]: W diag(gamma)
        self.register_buffer("w_gamma", w.sum(1), persistent=False)  # [H]
        self.register_buffer("bias", (first.weight @ norm.bias + first.bias).detach(), persistent=False)
        size = model.cfg.vision.image_size
        with torch.no_grad():  # each map's channel count, from one pass on a blank image
            shapes = tower.feature_maps(torch.zeros(1, 3, size, size, dtype=w.dtype))
        widths = [shapes[m].shape[1] for m in tower.maps]
        parts = torch.split(w, [*widths, w.shape[1] - sum(widths)], dim=1)
        self.convs = nn.ParameterList(
            [nn.Parameter(p[:, :, None, None].clone(), requires_grad=False) for p in parts[:-1]]
        )
        pos = tower.position[0].flatten(1)  # [P, G*G]
        const = torch.cat([parts[-1] @ pos, pos.sum(0, keepdim=True), pos.pow(2).sum(0, keepdim=True)])
        self.register_buffer("position", const.reshape(1, -1, self.grid, self.grid), persistent=False)

    @staticmethod
    def applies(model: FMVRLlava) -> bool:
        proj = model.projector
        return (
            hasattr(model.vision_tower, "feature_maps")
            and hasattr(model.vision_tower, "position")
            and proj.norm is not None
            and proj.crosslayer is None
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B,3,S,S] -> [B, G*G, D]
        maps = self.tower.feature_maps(pixel_values)
        total = self.position  # [1, H + 2, G, G]: W gamma x, sum x, sum x^2 per cell
        for m, w in zip(self.tower.maps, self.convs):
            f = maps[m]  # [B, C_m, h, h]
            if f.shape[-1] > self.grid:  # a finer map: average down to the grid first (as the tower)
                f = F.avg_pool2d(f, f.shape[-1] // self.grid)
            part = torch.cat([F.conv2d(f, w), f.sum(1, keepdim=True), f.pow(2).sum(1, keepdim=True)], 1)
            if part.shape[-1] < self.grid:  # a coarser map: its cells repeated k x k, as the tower does
                part = F.interpolate(part, scale_factor=self.grid // part.shape[-1], mode="nearest")
            total = total + part
        total = total.flatten(2).transpose(1, 2)  # [B, G*G, H + 2]
        wx, s1, s2 = total[..., :-2], total[..., -2:-1], total[..., -1:]
        mean = s1 / self.width
        scale = (s2 / self.width - mean * mean + self.eps).rsqrt()
        h = (wx - mean * self.w_gamma) * scale + self.bias  # the first layer's output
        return self.rest(h)


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
