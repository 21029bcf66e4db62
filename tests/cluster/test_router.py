"""The deadline-aware router on constructed routing statistics (no Ray, no timing)."""

from __future__ import annotations

import collections

import pytest

from runtime.cluster.router import (
    PowerOfTwo,
    ReplicaStats,
    RoundRobin,
    ServiceTime,
    choose,
    fit,
)
from runtime.policy import MIN_SAMPLES, Policy

BUDGETS = (576, 144, 36, 9, 1)
TTFT = {576: 900.0, 144: 300.0, 36: 160.0, 9: 130.0, 1: 120.0}  # p95 at load 0, ms
SERVICE = {b: ServiceTime(t, 60.0) for b, t in TTFT.items()}
CACHED = {b: ServiceTime(30.0, 60.0) for b in BUDGETS}  # a prefix hit: no vision, a short prefill
KEYS = {b: f"frame7@{b}" for b in BUDGETS}  # the request's prefix key per budget


def replica(name: str, backlog: float | None = 0.0, inflight: int = 0, **kw) -> ReplicaStats:
    kw.setdefault("service", SERVICE)
    return ReplicaStats(name, inflight=inflight, backlog_ms=backlog, cached=CACHED, **kw)


def test_a_tight_deadline_goes_to_the_idle_replica():
    stats = [replica("busy", backlog=500.0, inflight=2), replica("idle")]
    c = choose(200, BUDGETS, stats)
    assert (c.replica, c.budget, c.met) == ("idle", 36, True)
    assert c.predicted_ms == pytest.approx(160.0)
    # the same with in-flight counts only (the policy's load model: (1 + inflight) x)
    stats = [replica("busy", backlog=None, inflight=1), replica("idle", backlog=None)]
    c = choose(200, BUDGETS, stats)
    assert (c.replica, c.budget, c.met) == ("idle", 36, True)


@pytest.mark.parametrize(
    ("deadline", "budget"), [(5000, 576), (900, 576), (899, 144), (300, 144), (299, 36), (131, 9), (125, 1)]
)
def test_the_largest_budget_that_fits(deadline, budget):
    c = choose(deadline, BUDGETS, [replica("a")])
    assert (c.budget, c.met) == (budget, True)
    assert c.predicted_ms <= deadline


def test_budget_comes_before_an_earlier_finish():
    # "slow" is idle but twice as slow: 144 at 600 ms; "fast" has 50 ms of work ahead: 576 at 950 ms
    slow = replica("slow", service={b: ServiceTime(2 * t, 60.0) for b, t in TTFT.items()})
    c = choose(1000, BUDGETS, [slow, replica("fast", backlog=50.0)])
    assert (c.replica, c.budget, c.predicted_ms) == ("fast", 576, pytest.approx(950.0))


def test_same_budget_goes_to_the_earliest_finish():
    stats = [replica("a", backlog=100.0), replica("b", backlog=40.0), replica("c", backlog=70.0)]
    c = choose(1000, BUDGETS, stats)
    assert (c.replica, c.budget, c.predicted_ms) == ("b", 576, pytest.approx(940.0))


def test_only_the_allowed_budgets():
    c = choose(5000, (144, 36), [replica("a")])
    assert c.budget == 144
    assert choose(150, (144, 36), [replica("a")]).met is False


def test_stale_backlog_is_worked_off_by_its_age():
    s = replica("a", backlog=500.0, age_ms=400.0)
    assert s.predicted_ms(576) == pytest.approx(100.0 + 900.0)
    assert replica("b", backlog=500.0, age_ms=900.0).predicted_ms(576) == pytest.approx(900.0)


def test_prefix_affinity_wins_when_it_costs_nothing():
    # "holder" has 400 ms of work ahead but holds the frame's prefix at 144: 430 ms; "free" 300 ms.
    holder = replica("holder", backlog=400.0, prefix_keys=frozenset({KEYS[144]}))
    c = choose(500, BUDGETS, [replica("free"), holder], prefix_keys=KEYS)
    assert (c.replica, c.budget, c.met, c.prefix_hit) == ("holder", 144, True, True)
    assert c.predicted_ms == pytest.approx(430.0)
    assert "prefix affinity over free" in c.reason
    # without the request's keys, the earliest finish
    assert choose(500, BUDGETS, [replica("free"), holder]).replica == "free"


def test_prefix_affinity_loses_when_it_costs_budget():
    holder = replica("holder", backlog=400.0, prefix_keys=frozenset({KEYS[144]}))
    c = choose(1000, BUDGETS, [holder, replica("free")], prefix_keys=KEYS)
    assert (c.replica, c.budget, c.prefix_hit) == ("free", 576, False)  # the holder fits only 144


def test_prefix_affinity_loses_when_it_costs_the_deadline():
    holder = replica("holder", backlog=400.0, prefix_keys=frozenset({KEYS[144]}))  # 430 ms
    c = choose(400, BUDGETS, [holder, replica("free")], prefix_keys=KEYS)
    assert (c.replica, c.budget, c.met) == ("free", 144, True)


def test_a_prefix_cached_at_another_budget_does_not_count():
    # the key includes the budget: a prefix held at 36 does not help a request served at 144
    holder = replica("holder", backlog=100.0, prefix_keys=frozenset({KEYS[36]}))
    c = choose(500, BUDGETS, [holder, replica("free")], prefix_keys=KEYS)
    assert (c.replica, c.budget, c.prefix_hit) == ("free", 144, False)


def test_a_cached_prefix_can_buy_a_larger_budget():
    # 576 uncached takes 900 ms anywhere; the holder's cached 576 prefix answers in 30 + 200 ms
    holder = replica("holder", backlog=200.0, prefix_keys=frozenset({KEYS[576]}))
    c = choose(500, BUDGETS, [replica("free"), holder], prefix_keys=KEYS)
    assert (c.replica, c.budget, c.prefix_hit) == ("holder", 576, True)


def test_nothing_fits_the_earliest_finish_at_the_smallest_budget():
    stats = [replica("a", backlog=300.0), replica("b", backlog=100.0), replica("c", backlog=200.0)]
    c = choose(50, BUDGETS, stats)
    assert (c.replica, c.budget, c.met) == ("b", 1, False)
    assert c.predicted_ms == pytest.approx(220.0)
    assert "no replica meets 50 ms" in c.reason


def test_ties_are_spread_with_an_rng():
    import random

    stats = [replica(f"r{i}") for i in range(4)]
    assert {choose(1000, BUDGETS, stats).replica for _ in range(20)} == {"r0"}  # no rng: the first
    rng = random.Random(0)
    assert {choose(1000, BUDGETS, stats, rng=rng).replica for _ in range(40)} == {"r0", "r1", "r2", "r3"}


def test_spread_draws_two_among_the_equally_good():
    import random

    slow = replica("slow", service={b: ServiceTime(2 * t, 60.0) for b, t in TTFT.items()})  # 144 at best
    stats = [slow] + [replica(f"r{i}", backlog=10.0 * i) for i in range(6)]  # all fit 576
    rng = random.Random(1)
    picks = collections.Counter(choose(1000, BUDGETS, stats, rng=rng, spread=True) for _ in range(300))
    assert {c.budget for c in picks} == {576}
    names = collections.Counter(c.replica for c in picks.elements())
    assert (
        "slow" not in names and names["r5"] == 0
    )  # a smaller budget never; the latest finish never wins a pair
    assert len(names) == 5 and names["r0"] > names["r4"]  # spread, the earlier finishes more often
    assert {choose(1000, BUDGETS, stats).replica for _ in range(5)} == {"r0"}  # without: the earliest
    with pytest.raises(ValueError, match="rng"):
        choose(1000, BUDGETS, stats, spread=True)


def test_round_robin_cycles_whatever_the_load():
    stats = [replica("a", backlog=800.0), replica("b"), replica("c")]
    rr = RoundRobin()
    picks = [rr.choose(1000, BUDGETS, stats) for _ in range(6)]
    assert [c.replica for c in picks] == ["a", "b", "c", "a", "b", "c"]
    # the budget by the same per-replica rule: "a" has 800 ms ahead, so 36 (960 ms) is its largest
    assert [c.budget for c in picks[:3]] == [36, 576, 576]
    assert picks[0].budget == fit(stats[0], 1000, BUDGETS).budget


def test_power_of_two_picks_the_less_loaded_of_its_two():
    two = [replica("loaded", inflight=5), replica("light", inflight=1)]
    p2 = PowerOfTwo(seed=3)
    assert {p2.choose(1000, BUDGETS, two).replica for _ in range(20)} == {"light"}
    # of three, the most loaded never wins and the least loaded wins whenever drawn (2 of 3 pairs)
    three = [replica("r0", inflight=0), replica("r1", inflight=1), replica("r2", inflight=2)]
    counts = collections.Counter(p2.choose(1000, BUDGETS, three).replica for _ in range(600))
    assert counts["r2"] == 0
    assert 0.58 < counts["r0"] / 600 < 0.75
    # seeded: the same sequence again
    a, b = PowerOfTwo(seed=7), PowerOfTwo(seed=7)
    assert [a.choose(1000, BUDGETS, three).replica for _ in range(30)] == [
        b.choose(1000, BUDGETS, three).replica for _ in range(30)
    ]


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="no replicas"):
        choose(100, BUDGETS, [])
    with pytest.raises(ValueError, match="objective"):
        choose(100, BUDGETS, [replica("a")], objective="p99")
    with pytest.raises(ValueError, match="serves any"):
        choose(100, (77,), [replica("a")])


def test_statistics_come_from_the_policy(synthetic_profile):
    pol = Policy(synthetic_profile, BUDGETS)
    s = ReplicaStats.from_policy("a", pol, text_tokens=40, max_new_tokens=10, suffix_tokens=15)
    for b in BUDGETS:
        p = pol.predict(b, 40, 10)
        assert s.service[b] == (pytest.approx(p.ttft_ms), pytest.approx(p.stages["decode"]))
        # cached: preprocess + the 15 text tokens after the image, no vision, the same decode
        assert s.cached[b].ttft_ms == pytest.approx(1.0 + 1.0 + 0.1 * 15)
        assert s.cached[b].decode_ms == pytest.approx(20.0)
    # nothing learned: each level is processor sharing, and past the last level too
    assert [r["ttft"] for r in s.load_ratio] == pytest.approx([1, 2, 3, 4])
    assert s.ratio(7)["ttft"] == pytest.approx(8.0)
    counted = ReplicaStats.from_policy("a", pol, text_tokens=40, max_new_tokens=10, inflight=2)
    assert counted.predicted_ms(36) == pytest.approx(3 * pol.predict(36, 40, 10).ttft_ms)


def test_a_learned_correction_moves_the_statistics(synthetic_profile):
    pol = Policy(synthetic_profile, BUDGETS)
    raw = pol.raw(144, 40, 10)
    twice = {"vision": 2 * raw["vision"], "prefill": 2 * raw["prefill"], "decode": raw["decode"]}
    for _ in range(MIN_SAMPLES):
        pol.observe(144, 40, 10, twice, load=0)
    s = ReplicaStats.from_policy("a", pol, text_tokens=40, max_new_tokens=10)
    assert s.service[144].ttft_ms == pytest.approx(1.0 + 2 * (raw["vision"] + raw["prefill"]))
    # relative to level 0, level 1 borrows level 0's correction x 2 (processor sharing)
    assert s.load_ratio[1]["ttft"] == pytest.approx(2.0)
