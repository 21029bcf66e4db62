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
    ds = BenchDataset("val", n, tok, cfg, "vicuna_v1", independent=False)  # plain causal rows (HF forward)
    return collate(
        [ds.example(i) for i in range(n)], [p for i in range(n) for p in ds.images(i)], cfg, cfg.budgets
    )


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


def test_cached_tower_features_are_float32_inside_a_bf16_step(tiny_cfg, tiny_tokenizer):
    """The cache keeps what the exported float32 graph will compute, not the bf16 autocast output."""
    model = build_model(tiny_cfg, seed=2)
    batch = _batch(tiny_cfg, tiny_tokenizer)
    cache = VisionCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = cache.features(model, batch)
    with torch.no_grad():
        exact = model.vision_tower(batch.pixel_values)
    assert cached.dtype == torch.float32 and torch.allclose(cached, exact, atol=1e-5)


def test_budget_modes():
    assert step_budgets((576, 36), "mean") == (576, 36)
    picks = {step_budgets((576, 144, 36, 9, 1), "random", random.Random(s))[0] for s in range(50)}
    assert picks == {576, 144, 36, 9, 1}
    with pytest.raises(ValueError, match="mean or random"):
        step_budgets((1,), "all")


def test_question_blocks_equal_separate_single_question_prompts(tiny_cfg, tiny_tokenizer):
    """Independent questions packed after one shared image prefix give exactly the summed loss
    of each question alone (its own prompt, positions and attention): nothing leaks across."""
    from fmvr.model import build_model
    from train.data import Example, collate, tokenize, tokenize_blocks
    from train.loss import lm_loss_sum

    model = build_model(tiny_cfg, seed=1)
    qas = [
        ("What colour is the circle?", "red"),
        ("How many blue objects are there?", "two"),
        ("Is it?", "no"),
    ]
    ids, target, blocks = tokenize_blocks(tiny_tokenizer, tiny_cfg, "vicuna_v1", qas, 2048)
    assert blocks.count(0) == ids.index(tiny_cfg.image_token_id) + 1 and max(blocks) == 3
    feats = torch.randn(1, 9, tiny_cfg.text.hidden_size)
    packed = collate([Example(tuple(ids), tuple(target), ("k",), 0, tuple(blocks))], None, tiny_cfg, (9,))
    p_ids, p_mask, p_labels = packed.per_budget[9]
    assert p_mask.shape == (1, 1, p_ids.shape[1], p_ids.shape[1])
    with torch.no_grad():
        together = lm_loss_sum(model, p_ids, p_mask, p_labels, feats)
        alone = 0.0
        for q, a in qas:
            conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            one = collate(
                [
                    Example(
                        *map(tuple, tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", conv, 2048)), ("k",), 0
                    )
                ],
                None,
                tiny_cfg,
                (9,),
            )
            alone += float(lm_loss_sum(model, *one.per_budget[9][:3], feats))
    assert abs(float(together) - alone) < 1e-3 * alone


def test_question_blocks_pad_without_nan(tiny_cfg, tiny_tokenizer):
    from fmvr.model import build_model
    from train.data import Example, collate, tokenize_blocks
    from train.loss import lm_loss_sum

    model = build_model(tiny_cfg, seed=1)
    long = tokenize_blocks(
        tiny_tokenizer, tiny_cfg, "vicuna_v1", [("What colour is the circle?", "red")] * 3, 2048
    )
    short = tokenize_blocks(tiny_tokenizer, tiny_cfg, "vicuna_v1", [("Is it?", "no")], 2048)
    exs = [Example(*map(tuple, x[:2]), ("k",), i, tuple(x[2])) for i, x in enumerate((long, short))]
    feats = torch.randn(2, 36, tiny_cfg.text.hidden_size)
    with torch.no_grad():
        both = lm_loss_sum(model, *collate(exs, None, tiny_cfg, (36,)).per_budget[36], feats)
        each = sum(
            float(lm_loss_sum(model, *collate([e], None, tiny_cfg, (36,)).per_budget[36], feats[i : i + 1]))
            for i, e in enumerate(exs)
        )
    assert torch.isfinite(both) and abs(float(both) - each) < 1e-3 * each


def test_two_frame_blocks_equal_each_question_alone(tiny_cfg, tiny_tokenizer):
    """A clip's question blocks share both frames in the prefix: the packed loss is the sum of
    each question asked alone with the same two images."""
    from fmvr.model import build_model
    from train.data import Example, collate, tokenize, tokenize_blocks
    from train.loss import lm_loss_sum

    model = build_model(tiny_cfg, seed=1)
    qas = [("Which object appeared in the second frame?", "ring"), ("Which frames show the circle?", "both")]
    ids, target, blocks = tokenize_blocks(tiny_tokenizer, tiny_cfg, "vicuna_v1", qas, 2048, images=2)
    feats = torch.randn(2, 9, tiny_cfg.text.hidden_size)  # frame 1, frame 2
    packed = collate([Example(tuple(ids), tuple(target), ("a", "b"), 0, tuple(blocks))], None, tiny_cfg, (9,))
    with torch.no_grad():
        together = float(lm_loss_sum(model, *packed.per_budget[9], feats))
        alone = 0.0
        for q, a in qas:
            conv = [{"from": "human", "value": f"<image>\n<image>\n{q}"}, {"from": "gpt", "value": a}]
            one = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", conv, 2048, images=2)
            b = collate([Example(*map(tuple, one), ("a", "b"), 0)], None, tiny_cfg, (9,))
            alone += float(lm_loss_sum(model, *b.per_budget[9], feats))
    assert abs(together - alone) < 1e-3 * alone
