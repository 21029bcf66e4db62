"""torchrun --nproc_per_node 2 on CPU (gloo): ranks agree, and equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmvr.config import preset
from fmvr.model import build_model
from train.loop import train_model, trainable_named
from train.stages import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from train.loop import train_model, trainable_named
from train.stages import TrainConfig
cfg = TrainConfig(**json.loads(sys.argv[1])).check()
model, final = train_model(cfg)
state = {k: v.detach().contiguous() for k, v in trainable_named(model).items()}
assert (final / "model.safetensors").is_file() or os.environ["RANK"] != "0"
save_file(state, os.path.join(cfg.out, "rank%s.safetensors" % os.environ["RANK"]))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_each_other_and_one_process(tmp_path, mode):
    common = dict(bench_n=8, steps=3, lr=3e-3, warmup_ratio=0.0, progress=False, seed=0)
    ddp_cfg = dict(common, out=str(tmp_path / "ddp"), batch_size=1, grad_accum=2, fsdp=mode == "fsdp")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        json.dumps(ddp_cfg),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas bitwise identical
    # one process, global batch 4 = 2 ranks x 1 sample x 2 accumulation steps, same sample order
    single, _ = train_model(TrainConfig(**dict(common, out=str(tmp_path / "one"), batch_size=4)).check())
    ref = trainable_named(single)
    diffs = {k: float((r0[k] - ref[k].detach()).abs().max()) for k in r0}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, (worst, diffs[worst], sorted(diffs.items(), key=lambda kv: -kv[1])[:6])
    init = dict(build_model(preset("tiny"), seed=0).named_parameters())
    assert sum(not torch.equal(r0[k], init[k].detach()) for k in r0) == len(r0)  # every trainable moved
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
