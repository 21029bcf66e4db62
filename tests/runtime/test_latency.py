"""`python -m runtime latency`: the load runs at several concurrencies and the promise check."""

from __future__ import annotations

import json

from runtime.tools.latency import load_check, run_latency


def _run(config: str, deadline: float, met: float, budget: float) -> dict:
    return {"config": config, "deadline_ms": deadline, "met_fraction": met, "mean_budget": budget}


def test_load_check_compares_the_policy_with_the_largest_fixed_budget_that_keeps_99_percent():
    load = {
        "deadlines_ms": [10.0, 20.0, 30.0],
        "runs": [
            _run("policy", 10.0, 0.5, 1.0),  # no fixed budget keeps 99 % here: nothing to keep
            _run("fixed 144", 10.0, 0.2, 144),
            _run("fixed 1", 10.0, 0.9, 1),
            _run("policy", 20.0, 1.0, 20.0),  # met, but a smaller mean budget than fixed 36: broken
            _run("fixed 144", 20.0, 0.5, 144),
            _run("fixed 36", 20.0, 1.0, 36),
            _run("fixed 1", 20.0, 1.0, 1),
            _run("policy", 30.0, 0.99, 150.0),  # kept
            _run("fixed 144", 30.0, 1.0, 144),
        ],
    }
    rows = {r["deadline_ms"]: r for r in load_check(load)}
    assert rows[10.0]["best_fixed"] is None and rows[10.0]["kept"]
    assert rows[20.0]["best_fixed"] == "fixed 36" and not rows[20.0]["kept"]
    assert rows[30.0]["best_fixed_budget"] == 144 and rows[30.0]["kept"]


def test_bench_runs_one_load_run_per_concurrency(tiny_bundle, tmp_path):
    from runtime.pipeline import Pipeline

    # its own pipeline: the bench measures a profile into it, which the shared `pipe` must not get
    pipe = Pipeline.load(tiny_bundle, threads=1, kv_cache_mb=0)  # two clients at once: no KV budget
    rep = run_latency(pipe, tmp_path, runs=1, requests=3, concurrency=(1, 2))
    assert [load["concurrency"] for load in rep["load"]] == [1, 2]
    for load in rep["load"]:
        assert len(load["check"]) == len(load["deadlines_ms"]) == 3
        assert {r["config"] for r in load["runs"]} == {"policy", *(f"fixed {t}" for t in pipe.budgets)}
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert [load["concurrency"] for load in saved["load"]] == [1, 2]
    assert saved["code"]["source_sha256"] and "command" in saved  # what measured it
    md = (tmp_path / "latency.md").read_text()
    assert "1 concurrent clients" in md and "2 concurrent clients" in md and md.count("| kept |") == 2
