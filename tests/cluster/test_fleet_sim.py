"""benchmarks/fleet_sim.py on a tiny fleet: conservation, determinism, the routers' order, and
the service model read from the committed results."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fs():
    """benchmarks/fleet_sim.py as a module (registered: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("fleet_sim", ROOT / "benchmarks" / "fleet_sim.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("fleet_sim", None)


@pytest.fixture(scope="module")
def setup(fs):
    """The service model from the committed results, the warmed policy, its statistics, deadlines."""
    decoder = {
        **json.loads(fs.DECODER_RESULT.read_text()),
        "_path": "benchmarks/results/decoder_speed_small.json",
    }
    model = fs.model_from_results(fs.LATENCY_RESULT, decoder, None)
    pol = fs.warm_policy(model, 8, random.Random(0))
    stats0 = fs.ReplicaStats.from_policy(
        "r", pol, text_tokens=fs.TEXT_TOKENS, max_new_tokens=8, suffix_tokens=fs.SUFFIX_TOKENS
    )
    deadlines = {k: 1.5 * stats0.service[b].ttft_ms for k, b in fs.CLASSES.items()}
    return model, pol, stats0, deadlines


def tiny(fs, setup, router: str, *, staleness: float = 0.0, mix=None, budget_by="router", seed=0, **kw):
    model, _, stats0, deadlines = setup
    opts = dict(
        replicas=2,
        clients=8,
        think_ms=800.0,
        deadlines=deadlines,
        mix=mix or {"tight": 1.0},
        router=router,
        staleness_ms=staleness,
        local=False,
        proxies=1,
        budget_by=budget_by,
        requests=300,
        warmup=0.1,
        new_tokens=8,
        follow_up=0.3,
        cache_mb=256,
        seed=seed,
    )
    return fs.simulate(model, stats0, **{**opts, **kw})


def test_without_a_profile_the_committed_results_drive_the_service_model(fs, setup):
    if list(ROOT.glob("runs/*/bundle/profile-*.json")):
        pytest.skip("a profile exists under runs/*/bundle: the simulation would use it")
    model = fs.load_model(fs.build_parser().parse_args([]))
    assert model.ttft_ms == setup[0].ttft_ms
    lat = json.loads(fs.LATENCY_RESULT.read_text())
    assert model.ttft_ms == {r["budget"]: pytest.approx(r["ttft_ms"]) for r in lat["ttft"]}
    assert model.source["latency_result"] == "benchmarks/results/latency_small/latency.json"
    assert 0 < model.sigma < 0.5 and 0 <= model.tail_p < 0.5
    # the router's p95 sits above the medians it was warmed on
    assert all(setup[2].service[b].ttft_ms > model.ttft_ms[b] for b in fs.BUDGETS)


@pytest.mark.parametrize("router", ["round_robin", "power_of_two", "deadline", "deadline_spread"])
def test_every_request_is_answered_exactly_once(fs, setup, router):
    r = tiny(fs, setup, router, staleness=500.0, local=router != "round_robin")
    assert r["issued"] == r["answered"] == 334  # ceil(300 / 0.9)
    assert r["answered_once"] is True
    assert r["requests"] == 300
    assert sum(r["budgets"].values()) == 300


def test_deadline_aware_keeps_tight_deadlines_better_than_round_robin(fs, setup):
    rr = tiny(fs, setup, "round_robin")
    dl = tiny(fs, setup, "deadline")
    assert dl["hit_rate"] >= rr["hit_rate"]
    assert dl["hit_rate"] > 0.85


def test_stale_statistics_hurt(fs, setup):
    fresh = tiny(fs, setup, "deadline", mix={"tight": 0.5, "loose": 0.5})
    stale = tiny(fs, setup, "deadline", mix={"tight": 0.5, "loose": 0.5}, staleness=5000.0)
    assert stale["hit_rate"] < fresh["hit_rate"]


def test_the_same_seed_gives_the_same_run(fs, setup):
    a = tiny(fs, setup, "power_of_two", staleness=100.0, budget_by="replica", seed=3)
    b = tiny(fs, setup, "power_of_two", staleness=100.0, budget_by="replica", seed=3)
    assert a == b
    assert tiny(fs, setup, "power_of_two", staleness=100.0, budget_by="replica", seed=4) != a


def test_the_replica_budget_is_the_runtime_policy_choice(fs, setup):
    _, pol, stats0, deadlines = setup
    for waited in (0.0, 50.0, 150.0, 400.0, 900.0, 5000.0):
        for d in deadlines.values():
            want = pol.choose(d - waited, fs.TEXT_TOKENS, 8).budget if d > waited else min(fs.BUDGETS)
            assert fs.replica_budget(stats0, d, waited) == want, (d, waited)
