"""benchmarks/train_evidence.py end to end on tiny: per-run results, the flat rows, the command line."""

from __future__ import annotations

import json

from fmvr import tasks


def test_tiny_study_with_clips_writes_rows_and_reproducible_command(tmp_path, benchmark_script):
    ev = benchmark_script("train_evidence")
    argv = ["--steps", "2", "--batch-size", "2", "--bench-n", "4", "--eval-n", "2", "--clips", "3"]
    argv += ["--seeds", "0", "--pyramids", "fmvr,m3", "--tokens", "9", "--runs", str(tmp_path / "runs")]
    argv += ["--out", str(tmp_path / "out")]
    assert ev.main(argv) == 0
    data = json.loads((tmp_path / "out" / "train_evidence.json").read_text())
    cats = {*tasks.CATEGORIES, "all", tasks.CLIP_CATEGORY}
    assert {(r["pyramid"], r["category"]) for r in data["rows"]} == {
        (p, c) for p in ("fmvr", "m3") for c in cats
    }
    assert all(r["tokens"] == 9 and 0 <= r["accuracy"] <= 1 for r in data["rows"])
    assert {r["category"]: r["n"] for r in data["rows"]}[tasks.CLIP_CATEGORY] == 2
    assert data["constant_baseline"][tasks.CLIP_CATEGORY]["accuracy"] > 0
    md = (tmp_path / "out" / "train_evidence.md").read_text()
    command = next(line for line in md.splitlines() if line.startswith("Command:"))
    assert ev.parse_args(command.split("`")[1].split()[2:]) == ev.parse_args(argv)  # it reproduces the run
    assert "| best constant answer |" in md and "frames" in md
    assert "| fmvr | 1 | 9 |" in md  # one seed finished

    # an interrupted study is summarised from what finished, training nothing more
    more = ["--pyramids", "fmvr,m3,none", "--seeds", "0,1", "--finished-only", "--name", "partial"]
    assert ev.main(argv + more) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fmvr-s0", "m3-s0"]
    partial = json.loads((tmp_path / "out" / "partial.json").read_text())
    assert partial["rows"] == data["rows"]


def test_the_none_cascade_runs_at_its_only_budget_whatever_tokens_says(benchmark_script):
    """--tokens 36,9 is a choice for the multi-budget cascades; plain LLaVA (none) has only the
    full grid, so it trains and is scored there instead of failing the study."""
    ev = benchmark_script("train_evidence")
    args = ev.parse_args(["--preset", "small", "--tokens", "36,9"])
    assert ev.run_tokens(args, "fmvr") == "36,9" and ev.run_tokens(args, "m3") == "36,9"
    assert ev.run_tokens(args, "none") == "576"
    assert ev.run_tokens(ev.parse_args(["--tokens", "all"]), "none") == "all"


def test_a_ground_first_stage_runs_before_stage_2_and_feeds_it(tmp_path, benchmark_script):
    ev = benchmark_script("train_evidence")
    argv = ["--steps", "1", "--batch-size", "2", "--bench-n", "4", "--eval-n", "1", "--seeds", "0"]
    argv += ["--pyramids", "fmvr", "--tokens", "144,36,9", "--ground-steps", "2", "--ground-batch-size", "2"]
    argv += ["--ground-tokens", "36,9"]  # the demo's recipe: ground at 36/9, stage 2 at 144/36/9
    argv += ["--eval-tokens", "all"]  # trained at 144/36/9, scored at every budget
    argv += ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert ev.main(argv) == 0
    run = tmp_path / "runs" / "fmvr-s0"
    ground = json.loads((run / "ground" / "final" / "extra.json").read_text())["train_config"]
    assert ground["stage"] == "ground" and ground["budget_mode"] == "mean" and ground["steps"] == 2
    assert ground["tokens"] == "36,9"
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["init"] == str(run / "ground" / "final") and result["config"]["bench_seed"] == 1
    assert result["config"]["tokens"] == "144,36,9"
    assert set(result["accuracy"]) == {"576", "144", "36", "9", "1"}
