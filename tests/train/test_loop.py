"""The loop: loss goes down, only the stage's parameters change, resume is exact, CLI works."""

from __future__ import annotations

import json

import pytest
import torch

from fmvr.checkpoint import load_checkpoint
from train.__main__ import main
from train.common import step_indices
from train.loop import rank_micro_batches, train
from train.stages import TrainConfig


def _cfg(tmp_path, name, **kw):
    base = dict(
        out=str(tmp_path / name),
        bench_n=8,
        batch_size=2,
        steps=4,
        lr=3e-3,
        warmup_ratio=0.0,
        progress=False,
        seed=0,
        cache_vision=True,  # the cached-feature path (DDP tests cover the uncached one)
    )
    base.update(kw)
    return TrainConfig(**base).check()


def _state(path):
    return load_checkpoint(path).state_dict()


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """A fresh tiny model saved as a checkpoint (what --init would load)."""
    from fmvr.checkpoint import save_checkpoint
    from fmvr.config import preset
    from fmvr.model import build_model
    from fmvr.tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("init") / "ckpt"
    save_checkpoint(build_model(preset("tiny"), seed=0), path, tokenizer=build_tiny_tokenizer())
    return str(path)


def test_stage1_trains_only_projector_and_pyramid_and_lowers_loss(tmp_path, init_ckpt):
    cfg = _cfg(tmp_path, "s1", stage="stage1", init=init_ckpt, steps=6, lr=1e-2, bench_n=4, batch_size=4)
    final = train(cfg)
    before, after = load_checkpoint(init_ckpt).state_dict(), _state(final)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "pyramid"}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1  # the same 4 captions every step (a random frozen LLM: slow)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = train(_cfg(tmp_path, "straight"))
    stopped = _cfg(tmp_path, "resumed", stop_after=2, keep_last=1)
    with pytest.raises(Exception, match="--resume"):
        train(stopped)
    ckpts = sorted((tmp_path / "resumed").glob("ckpt-*"))
    assert [p.name for p in ckpts] == ["ckpt-0000002"]
    resumed = train(_cfg(tmp_path, "resumed", keep_last=1), resume=True)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_data_order_is_a_function_of_seed_and_step():
    a = step_indices(10, 4, seed=0, step=3)
    assert a == step_indices(10, 4, seed=0, step=3) and len(set(a)) == 4
    epoch0 = sum((step_indices(10, 4, 0, s) for s in range(2)), [])
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    parts = rank_micro_batches(list(range(8)), 2, 2, rank=1, world=2)
    assert parts == [[2, 3], [6, 7]]


def test_cli_config_file_flags_and_skip_if_done(tmp_path, capsys):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"bench_n": 4, "batch_size": 2, "steps": 1, "lr": 1e-3, "progress": False}))
    args = [
        "--config",
        str(conf),
        "--out",
        str(tmp_path / "cli"),
        "--budget-mode",
        "random",
        "--lora",
        "--lora-r",
        "4",
        "--grad-checkpointing",
    ]
    assert main(args) == 0
    extra = json.loads((tmp_path / "cli" / "final" / "extra.json").read_text())
    assert extra["train_config"]["lora"] and extra["train_config"]["budget_mode"] == "random"
    assert extra["train_config"]["grad_checkpointing"]
    assert load_checkpoint(tmp_path / "cli" / "final") is not None  # LoRA merged into a plain checkpoint
    assert main([*args, "--skip-if-done"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["--stage", "finetune", "--out", str(tmp_path / "x")]) == 2  # finetune needs --init


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sigint"
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--out",
        str(out),
        "--steps",
        "200",
        "--bench-n",
        "8",
        "--batch-size",
        "1",
        "--no-progress",
        "--lr",
        "1e-4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout
    ckpts = sorted(out.glob("ckpt-*"))
    assert (
        len(ckpts) == 1
        and (ckpts[0] / "trainer.pt").is_file()
        and (ckpts[0] / "model" / "model.safetensors").is_file()
    )
    assert not list(out.glob(".*.tmp"))  # nothing half-written left behind


def test_trains_from_llava_files_skipping_a_corrupt_image(tmp_path):
    from fmvr import tasks
    from train.data import DataError

    path = tasks.write_llava(tmp_path / "d", "train", 4, kind="qa")
    records = json.loads(path.read_text())
    (tmp_path / "d" / records[1]["image"]).write_bytes(b"broken")
    cfg = _cfg(tmp_path, "llava", data=str(path), image_folder=str(tmp_path / "d"), steps=2, batch_size=2)
    with pytest.warns(UserWarning, match="corrupt image"):
        final = train(cfg)
    assert json.loads((final / "extra.json").read_text())["skipped_samples"]  # counted and reported
    with pytest.raises(DataError, match="corrupt image"):
        train(
            _cfg(
                tmp_path,
                "strict",
                data=str(path),
                image_folder=str(tmp_path / "d"),
                steps=2,
                batch_size=2,
                strict_data=True,
            )
        )


def test_visual_norm_flag_builds_a_normed_model_that_its_checkpoint_keeps(tmp_path):
    """--visual-norm reaches a fresh model (and its saved config); without it there is no norm."""
    assert main(["--out", str(tmp_path / "vn"), "--steps", "1", "--bench-n", "2", "--batch-size", "2",
                 "--no-progress", "--visual-norm"]) == 0  # fmt: skip
    model = load_checkpoint(tmp_path / "vn" / "final")
    assert model.cfg.visual_norm and model.visual_norm is not None
    plain = load_checkpoint(train(_cfg(tmp_path, "plain", steps=1, bench_n=2)))
    assert plain.visual_norm is None


# ---- the FMVR blocks' own learning rate, and a cascade swapped in at --init ---------------------


def _pyramid(state):
    return {k: v for k, v in state.items() if k.startswith("pyramid.")}


def test_pyramid_lr_zero_freezes_the_blocks_and_a_nonzero_one_is_theirs_alone(tmp_path, init_ckpt):
    from train.common import build_model_and_tokenizer, make_optimizer

    before = _pyramid(_state(init_ckpt))
    assert before and any(v.abs().sum() > 0 for v in before.values())
    frozen = _cfg(tmp_path, "frozen", init=str(init_ckpt), pyramid_lr=0.0, projector_lr=1e-2)
    after = _pyramid(_state(train(frozen)))
    assert all(torch.equal(before[k], after[k]) for k in before)  # not one block parameter moved
    moving = _cfg(tmp_path, "moving", init=str(init_ckpt), pyramid_lr=1e-2, projector_lr=0.0, lr=1e-9)
    after = _pyramid(_state(train(moving)))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model, _ = build_model_and_tokenizer(
        _cfg(tmp_path, "g", init=str(init_ckpt), pyramid_lr=3e-4, projector_lr=0.5)
    )
    opt, _ = make_optimizer(_cfg(tmp_path, "g", pyramid_lr=3e-4, projector_lr=0.5), model, 4)
    ids = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {ids[id(p)] for p in model.pyramid.parameters()} == {
        3e-4
    }  # the projector's 0.5 never reaches them
    assert {ids[id(p)] for p in model.projector.parameters()} == {0.5}


def test_a_plain_llava_start_is_adapted_with_another_cascade(tmp_path):
    none = train(_cfg(tmp_path, "none", pyramid="none", stage="stage1", tokens="576"))
    assert load_checkpoint(none).cfg.pyramid == "none"
    for arm in ("fmvr", "m3"):
        out = train(_cfg(tmp_path, arm, init=str(none), pyramid=arm, tokens="144,36,9", budget_mode="random"))
        model = load_checkpoint(out)
        assert model.cfg.pyramid == arm and model.cfg.budgets == (576, 144, 36, 9, 1)
        kept = {k: v for k, v in _state(none).items() if k.startswith("projector.")}
        assert (
            all(torch.equal(kept[k], model.state_dict()[k]) for k in kept) is False
        )  # the projector trained on
    with pytest.raises(ValueError, match="pyramid 'mmm'"):
        _cfg(tmp_path, "bad", pyramid="mmm")
    with pytest.raises(ValueError, match="--pyramid-lr"):
        _cfg(tmp_path, "bad", pyramid_lr=-0.5)
