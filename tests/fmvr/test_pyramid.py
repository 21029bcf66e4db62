"""The FMVR block and the cascades against an independent numpy reference (REFERENCE.md s.1)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmvr.config import PYRAMIDS, preset
from fmvr.pyramid import FMVRBlock, Pyramid

PARAM_NAMES = ("low_weight", "high_weight", "a", "b")


# ---- the reference, written from the formulas (numpy, float64, no fmvr code) ----------------
def np_maxpool3(x: np.ndarray) -> np.ndarray:
    """3x3 max pool, stride 1, padding 1 with -inf: x [C, h, w] -> [C, h, w]."""
    c, h, w = x.shape
    padded = np.full((c, h + 2, w + 2), -np.inf)
    padded[:, 1:-1, 1:-1] = x
    out = np.full_like(x, -np.inf)
    for dy in range(3):
        for dx in range(3):
            out = np.maximum(out, padded[:, dy : dy + h, dx : dx + w])
    return out


def np_block(x: np.ndarray, p: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """F(x) on x [C, h, w]; p[branch][name] is [C] (broadcast per channel)."""
    g = {k: v[:, None, None] for k, v in p["gap"].items()}
    m = {k: v[:, None, None] for k, v in p["mp"].items()}
    low = x.mean(axis=(1, 2), keepdims=True)
    high = x - low
    avg = low * g["low_weight"] + high * (1 + g["high_weight"]) + g["a"] * x * high + g["b"] * x + x
    mhigh = np_maxpool3(x)
    mlow = x - mhigh
    mx = mlow * m["low_weight"] + mhigh * (1 + m["high_weight"]) + m["a"] * x * mhigh + m["b"] * x
    return avg + mx


def np_avgpool(x: np.ndarray, k: int) -> np.ndarray:
    """k x k average pool, stride k: [C, h, w] -> [C, h/k, w/k] (plain loops)."""
    c, h, w = x.shape
    out = np.zeros((c, h // k, w // k))
    for i in range(h // k):
        for j in range(w // k):
            out[:, i, j] = x[:, i * k : (i + 1) * k, j * k : (j + 1) * k].mean(axis=(1, 2))
    return out


def np_fmvr_cascade(tokens: np.ndarray, params: dict[int, dict], grid: int) -> dict[int, np.ndarray]:
    """tokens [N, D] row-major -> {T: [T, D]} for every budget of the FMVR cascade."""
    x = tokens.T.reshape(-1, grid, grid)  # [D, G, G]
    out = {grid * grid: tokens}
    side = grid
    while side > 1:
        pooled = np_avgpool(x, 2) if side % 2 == 0 else x.mean(axis=(1, 2), keepdims=True)
        side = side // 2 if side % 2 == 0 else 1
        x = np_block(pooled, params[side * side]) + pooled if side > 1 else pooled
        out[side * side] = x.reshape(x.shape[0], -1).T  # [T, D]
    return out


# ---- helpers ------------------------------------------------------------------------------
def grid_cfg(grid: int, pyramid: str = "fmvr", channels: int = 32):
    cfg = preset("tiny", pyramid=pyramid)
    vision = dataclasses.replace(cfg.vision, image_size=grid * cfg.vision.patch_size)
    text = dataclasses.replace(cfg.text, hidden_size=channels, num_heads=4, num_kv_heads=2)
    budgets = (grid * grid,) if pyramid == "none" else tuple(s * s for s in _sides(grid))
    return cfg.replace(vision=vision, text=text, budgets=budgets)


def _sides(grid: int) -> list[int]:
    sides = [grid]
    while sides[-1] > 1:
        sides.append(sides[-1] // 2 if sides[-1] % 2 == 0 else 1)
    return sides


def randomise(pyr: Pyramid, seed: int) -> dict[int, dict]:
    """Random non-default parameters; returns them as numpy {T: {branch: {name: [C]}}}."""
    gen = torch.Generator().manual_seed(seed)
    params: dict[int, dict] = {}
    with torch.no_grad():
        for name, p in pyr.named_parameters():
            _, t, branch, pname = name.split(".")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            params.setdefault(int(t), {}).setdefault(branch, {})[pname] = p.double().flatten().numpy()
    return params


# ---- the block ----------------------------------------------------------------------------
def test_block_at_init_is_5x_minus_mean_plus_maxpool():
    x = torch.randn(2, 16, 6, 6)
    y = FMVRBlock(16)(x) + x
    for b in range(2):
        xb = x[b].double().numpy()
        want = 5 * xb - xb.mean(axis=(1, 2), keepdims=True) + np_maxpool3(xb)
        np.testing.assert_allclose(y[b].detach().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [12, 3, 1])
def test_block_with_random_parameters_matches_reference(side):
    block = FMVRBlock(8)
    gen = torch.Generator().manual_seed(side)
    ref: dict[str, dict[str, np.ndarray]] = {"gap": {}, "mp": {}}
    with torch.no_grad():
        for name, p in block.named_parameters():
            branch, pname = name.split(".")
            p.copy_(torch.randn(p.shape, generator=gen))
            ref[branch][pname] = p.double().flatten().numpy()
    x = torch.randn(3, 8, side, side, generator=gen)
    y = block(x).detach().double().numpy()
    for b in range(3):
        np.testing.assert_allclose(y[b], np_block(x[b].double().numpy(), ref), rtol=1e-4, atol=1e-4)


def test_maxpool_pads_with_minus_infinity():
    """All-negative input: a zero pad would leak 0 into border maxima; -inf does not."""
    x = -torch.rand(1, 4, 5, 5) - 1.0
    block = FMVRBlock(4)
    with torch.no_grad():
        block.mp.b.zero_()  # max branch = maxpool3(x) at otherwise-default parameters
    high = block.mp(x)
    np.testing.assert_allclose(high[0].detach().numpy(), np_maxpool3(x[0].double().numpy()), rtol=1e-6)
    assert (high < -1).all()


# ---- the FMVR cascade ---------------------------------------------------------------------
@pytest.mark.parametrize("grid", [24, 16])
def test_fmvr_cascade_matches_reference_every_budget(grid):
    cfg = grid_cfg(grid)
    pyr = Pyramid(cfg)
    params = randomise(pyr, seed=grid)
    feats = torch.randn(2, grid * grid, 32)
    many = pyr.forward_many(feats, cfg.budgets)
    assert sorted(many) == sorted(cfg.budgets)
    for b in range(2):
        ref = np_fmvr_cascade(feats[b].double().numpy(), params, grid)
        assert sorted(ref) == sorted(cfg.budgets)
        for t in cfg.budgets:
            one = pyr(feats, t)
            assert one.shape == (2, t, 32)
            np.testing.assert_allclose(
                one[b].detach().numpy(), ref[t], rtol=1e-4, atol=1e-4, err_msg=f"T={t}"
            )
            torch.testing.assert_close(many[t], one)


def test_grid_16_budgets_and_stage_names():
    assert grid_cfg(16).budgets == (256, 64, 16, 4, 1)
    names = {n for n, _ in Pyramid(grid_cfg(16)).named_parameters()}
    assert names == {f"stages.{t}.{b}.{p}" for t in (64, 16, 4) for b in ("gap", "mp") for p in PARAM_NAMES}


def test_parameter_names_map_to_the_authors_keys(tiny_cfg):
    pyr = Pyramid(tiny_cfg)
    names = {n for n, _ in pyr.named_parameters()}
    assert names == {f"stages.{t}.{b}.{p}" for t in (144, 36, 9) for b in ("gap", "mp") for p in PARAM_NAMES}
    for name, p in pyr.named_parameters():
        assert p.shape == (tiny_cfg.text.hidden_size, 1, 1), name
        assert torch.all(p == (1.0 if name.endswith(".b") else 0.0)), name


def test_full_budget_is_the_grid_itself(tiny_cfg):
    pyr = Pyramid(tiny_cfg)
    randomise(pyr, seed=1)
    feats = torch.randn(1, 576, tiny_cfg.text.hidden_size)
    assert torch.equal(pyr(feats, 576), feats)


# ---- M3 and none --------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [24, 16])
def test_m3_is_avg_pool_of_the_grid(grid):
    cfg = grid_cfg(grid, "m3")
    pyr = Pyramid(cfg)
    assert not list(pyr.parameters())
    feats = torch.randn(2, grid * grid, 32)
    grid_map = feats.transpose(1, 2).reshape(2, 32, grid, grid)  # [B, D, G, G]
    for t in cfg.budgets:
        k = grid // int(round(t**0.5))
        want = F.avg_pool2d(grid_map, kernel_size=k, stride=k).flatten(2).transpose(1, 2)  # [B, T, D]
        torch.testing.assert_close(pyr(feats, t), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            pyr(feats, t)[1].numpy(), np_avgpool(grid_map[1].double().numpy(), k).reshape(32, -1).T, atol=1e-5
        )


def test_m3_differs_from_fmvr_below_144(tiny_cfg):
    feats = torch.randn(1, 576, tiny_cfg.text.hidden_size)
    m3 = Pyramid(preset("tiny", pyramid="m3"))
    fm = Pyramid(tiny_cfg)
    for t in (144, 36, 9, 1):
        assert not torch.allclose(m3(feats, t), fm(feats, t))


def test_fmvr_started_as_pooling_equals_m3_until_it_trains(tiny_cfg):
    feats = torch.randn(2, 576, tiny_cfg.text.hidden_size)
    m3 = Pyramid(preset("tiny", pyramid="m3"))
    fm = Pyramid(tiny_cfg)
    fm.start_as_pooling()
    for t in (576, 144, 36, 9, 1):
        torch.testing.assert_close(fm(feats, t), m3(feats, t), rtol=1e-5, atol=1e-5)
    fm(feats, 36).pow(2).sum().backward()  # the learnable part still gets gradients (levels 144 and 36)
    for t in ("144", "36"):
        assert all(float(b.high_weight.grad.abs().sum()) > 0 for b in (fm.stages[t].gap, fm.stages[t].mp))


def test_none_serves_only_576():
    cfg = preset("tiny", pyramid="none")
    pyr = Pyramid(cfg)
    assert cfg.budgets == (576,) and not list(pyr.parameters())
    feats = torch.randn(1, 576, cfg.text.hidden_size)
    assert torch.equal(pyr(feats, 576), feats)
    with pytest.raises(ValueError, match="valid budgets: 576$"):
        pyr(feats, 144)


@pytest.mark.parametrize("pyramid", ["fmvr", "m3"])
@pytest.mark.parametrize("tokens", [100, 0, 4, 577])
def test_budget_not_in_cascade_names_the_valid_ones(tiny_cfg, pyramid, tokens):
    pyr = Pyramid(preset("tiny", pyramid=pyramid))
    feats = torch.randn(1, 576, tiny_cfg.text.hidden_size)
    with pytest.raises(ValueError, match=f"^{tokens} visual tokens.*valid budgets: 576, 144, 36, 9, 1"):
        pyr(feats, tokens)
    with pytest.raises(ValueError, match="valid budgets"):
        pyr.forward_many(feats, (144, tokens))


def test_declared_subset_of_budgets_is_enforced():
    cfg = preset("tiny", budgets=(576, 36))
    pyr = Pyramid(cfg)
    feats = torch.randn(1, 576, cfg.text.hidden_size)
    assert pyr(feats, 36).shape == (1, 36, cfg.text.hidden_size)
    with pytest.raises(ValueError, match="valid budgets: 576, 36"):
        pyr(feats, 144)


def test_non_square_token_count_is_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="square"):
        Pyramid(tiny_cfg)(torch.randn(1, 575, tiny_cfg.text.hidden_size), 144)


@pytest.mark.parametrize("name", PYRAMIDS)
def test_every_cascade_row_builds_and_counts_its_stages(name):
    from fmvr.config import CASCADES
    from fmvr.flops import param_counts

    cfg = preset("tiny").with_pyramid(name)
    pyr = Pyramid(cfg)
    assert cfg.budgets == CASCADES[name].default_budgets(cfg.grid)
    assert sum(p.numel() for p in pyr.parameters()) == param_counts(cfg)["pyramid"]
    feats = torch.randn(1, cfg.full_budget, cfg.text.hidden_size)
    assert {t: v.shape[1] for t, v in pyr.forward_many(feats, cfg.budgets).items()} == {
        t: t for t in cfg.budgets
    }


def test_with_pyramid_keeps_chosen_budgets_and_refuses_unknown():
    cfg = preset("tiny").replace(budgets=(576, 36))
    assert cfg.with_pyramid("m3").budgets == (576, 36)
    assert cfg.with_pyramid("none").budgets == (576,)
    assert cfg.with_pyramid("none").with_pyramid("fmvr").budgets == cfg.cascade
    with pytest.raises(ValueError, match="choose one of fmvr, m3, none"):
        cfg.with_pyramid("m4")
