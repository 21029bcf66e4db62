"""scripts/gpu_check.py's CPU dry run on the tiny preset: every section runs and writes its JSON.
(On a GPU: `python scripts/gpu_check.py` with the defaults; not run here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--preset", "tiny"]
    cmd += ["--runs", "1", "--steps", "2", "--skip-export", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["dry_run"] and rec["device"]["device"] == "cpu"
    assert sorted(rec["inference_bf16"], key=int) == ["1", "9", "36", "144", "576"]
    assert all(v["vision_ms"]["p50"] > 0 for v in rec["inference_bf16"].values())
    train = rec["training"]
    assert train["finite"] and len(train["losses"]) == 2 and "checkpointing" in train
    assert train["checkpointing"] != "none"
