"""benchmarks/latency_ab.py's summary: medians per side and budget, refusals on mismatched sides."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("latency_ab", ROOT / "benchmarks" / "latency_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(pair, side, budget, ttft, flops=0.5):
    return {"pair": pair, "side": side, "budget": budget, "ttft_ms": ttft, "prefill_ms": ttft - 10,
            "vision_ms": 10.0, "ttft_ratio": ttft / 100, "flops_ratio": flops}  # fmt: skip


def test_the_summary_is_the_median_over_pairs_per_side(ab):
    runs = [row(p, s, 36, t) for p, s, t in [(1, "before", 100), (2, "before", 130), (3, "before", 90),
                                              (1, "after", 70), (2, "after", 75), (3, "after", 200)]]  # fmt: skip
    (got,) = ab.summarise(runs)
    assert got["budget"] == 36 and got["ttft_ms_before"] == 100 and got["ttft_ms_after"] == 75
    assert got["flops_ratio"] == 0.5 and "flops_ratio_after" not in got
    md = ab.to_markdown(
        {
            "command": "x",
            "pairs": 3,
            "sides": {"before": "a", "after": "b"},
            "summary": [got],
            "machine": {"cpu": "cpu", "logical_cpus": 2, "cpu_flags": ["amx_bf16"]},
        }  # fmt: skip
    )
    assert "| 36 | 100 | 75 |" in md and "amx_bf16" in md


def test_sides_that_serve_other_budgets_or_count_flops_differently_are_refused(ab):
    with pytest.raises(SystemExit, match="one side only"):
        ab.summarise([row(1, "before", 36, 100), row(1, "after", 9, 80)])
    with pytest.raises(SystemExit, match="FLOPs differently"):
        ab.summarise([row(1, "before", 36, 100, 0.5), row(1, "after", 36, 80, 0.4)])
