"""Training the `small` preset (real packaged weights) a few steps, and the tower learning
rate of the authors' finetune.sh (on tiny)."""

from __future__ import annotations

import json

import pytest
import torch

from train.loop import train_model
from train.stages import TrainConfig


def test_stage1_on_small_lowers_loss_and_trains_only_projector_and_pyramid(tmp_path, small_model):
    cfg = TrainConfig(
        stage="stage1",
        preset="small",
        out=str(tmp_path / "s1"),
        bench_n=2,
        batch_size=2,
        steps=3,
        lr=1e-3,
        warmup_ratio=0.0,
        progress=False,
        cache_vision=True,
    ).check()
    model, _ = train_model(cfg)
    before, after = small_model.state_dict(), model.state_dict()  # same seed, same packaged weights
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "pyramid"}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # the same 2 captions every step, every budget


def test_tower_lr_trains_the_tower_at_its_own_rate(tmp_path):
    cfg = TrainConfig(
        stage="stage2",
        out=str(tmp_path / "t"),
        bench_n=2,
        batch_size=2,
        steps=2,
        lr=1e-3,
        tower_lr=1e-4,
        warmup_ratio=0.0,
        progress=False,
        budget_mode="random",
    ).check()
    model, _ = train_model(cfg)
    from train.common import build_model_and_tokenizer, make_optimizer

    fresh, _ = build_model_and_tokenizer(cfg)
    moved = [
        k
        for k, v in fresh.vision_tower.state_dict().items()
        if not torch.equal(v, model.vision_tower.state_dict()[k])
    ]
    assert moved, "the tower did not train"
    opt, _ = make_optimizer(cfg, fresh, 10)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {rates[id(p)] for p in fresh.vision_tower.parameters()} == {1e-4}
    assert {rates[id(p)] for p in fresh.projector.parameters()} == {1e-3}


def test_tower_lr_refuses_the_feature_cache(tmp_path):
    with pytest.raises(ValueError, match="--cache-vision needs a frozen tower"):
        TrainConfig(out=str(tmp_path), tower_lr=1e-4, cache_vision=True).check()


def test_tokens_flag_restricts_and_validates(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), tokens="9,36").check()
    assert cfg.budget_list((576, 144, 36, 9, 1)) == (36, 9)
    assert TrainConfig(out=str(tmp_path)).check().budget_list((576, 1)) == (576, 1)
    with pytest.raises(ValueError, match=r"\[100\] are not budgets"):
        TrainConfig(out=str(tmp_path), tokens="36,100").check().budget_list((576, 144, 36, 9, 1))
