"""The Matryoshka loss (encode once) equals the mean of per-budget full forwards."""

from __future__ import annotations

import random

import pytest
import torch

from fmvr.config import preset
from fmvr.model import build_model
from train.data import BenchDataset, collate
from train.loss import MatryoshkaStep, VisionCache, matryoshka_loss, separate_losses, step_budgets


def _batch(cfg, tok, n=2):
    ds = BenchDataset("val", n, tok, cfg, "vicuna_v1")
    return collate([ds.example(i) for i in range(n)], [ds.image(i) for i in range(n)], cfg, cfg.budgets)


@pytest.mark.parametrize("pyramid", ["fmvr", "m3", "none"])
def test_equals_mean_of_separate_losses(pyramid, tiny_tokenizer):
    cfg = preset("tiny", pyramid=pyramid)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # make the FMVR stages non-trivial
        for p in model.pyramid.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _batch(cfg, tiny_tokenizer)
    loss, parts = matryoshka_loss(model, batch, cfg.budgets)
    ref = separate_losses(model, batch, cfg.budgets)
    assert set(parts) == set(cfg.budgets)
    for t in cfg.budgets:
        assert parts[t] == pytest.approx(float(ref[t].detach()), rel=1e-4, abs=1e-5)
    expected = torch.stack(list(ref.values())).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    # gradients agree too
    model.trainable(("projector", "pyramid", "language_model"))
    g1 = torch.autograd.grad(loss, model.projector.mlp[0].weight, retain_graph=False)[0]
    ref = separate_losses(model, batch, cfg.budgets)
    g2 = torch.autograd.grad(torch.stack(list(ref.values())).mean(), model.projector.mlp[0].weight)[0]
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-6)


def test_cached_tower_features_give_the_same_loss(tiny_cfg, tiny_tokenizer):
    model = build_model(tiny_cfg, seed=2)
    batch = _batch(tiny_cfg, tiny_tokenizer)
    direct, _ = MatryoshkaStep(model)(batch, (36, 1), float(batch.num_targets()))
    cache = VisionCache()
    first, _ = MatryoshkaStep(model, cache)(batch, (36, 1), float(batch.num_targets()))
    batch.pixel_values = None  # second epoch: features come from the cache
    second, _ = MatryoshkaStep(model, cache)(batch, (36, 1), float(batch.num_targets()))
    assert (
        float(direct.detach())
        == pytest.approx(float(first.detach()), rel=1e-6)
        == pytest.approx(float(second.detach()), rel=1e-6)
    )


def test_budget_modes():
    assert step_budgets((576, 36), "mean") == (576, 36)
    picks = {step_budgets((576, 144, 36, 9, 1), "random", random.Random(s))[0] for s in range(50)}
    assert picks == {576, 144, 36, 9, 1}
    with pytest.raises(ValueError, match="mean or random"):
        step_budgets((1,), "all")
