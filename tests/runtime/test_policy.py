"""The budget policy on synthetic profiles (no bundle, no timing)."""

from __future__ import annotations

import pytest

from runtime.policy import MIN_SAMPLES, DeadlineError, Policy

BUDGETS = (576, 144, 36, 9, 1)
TEXT = 40  # text tokens of the prompt


@pytest.fixture
def policy(synthetic_profile) -> Policy:
    return Policy(synthetic_profile, BUDGETS)


def ttft(t: int) -> float:
    # preprocess + vision + prefill(intercept + slope * (text + T))
    vision = {576: 40.0, 144: 20.0, 36: 10.0, 9: 8.0, 1: 7.0}[t]
    return 1.0 + vision + 1.0 + 0.1 * (TEXT + t)


def test_predictions_follow_the_profile(policy):
    for t in BUDGETS:
        p = policy.predict(t, TEXT, 10)
        assert p.ttft_ms == pytest.approx(ttft(t))
        assert p.total_ms == pytest.approx(ttft(t) + 20.0)


@pytest.mark.parametrize(
    ("latency", "budget"), [(1000, 576), (ttft(576), 576), (50, 144), (25, 36), (15, 9), (13.5, 1)]
)
def test_picks_the_largest_budget_that_fits(policy, latency, budget):
    c = policy.choose(latency, TEXT, 16)
    assert c.budget == budget
    assert c.deadline_met is True
    assert all(c.candidates[t] > latency for t in BUDGETS if t > budget)


def test_objective_total_counts_decoding(policy):
    # 144 fits ttft in 50 ms, but not with 16 tokens of decoding (+32 ms)
    assert policy.choose(50, TEXT, 16, objective="ttft").budget == 144
    assert policy.choose(50, TEXT, 16, objective="total").budget == 9


def test_no_budget_fits_falls_back_to_the_smallest(policy):
    c = policy.choose(5, TEXT, 16)
    assert (c.budget, c.deadline_met) == (1, False)
    assert "no budget fits" in c.reason


def test_strict_raises_when_nothing_fits(policy):
    with pytest.raises(DeadlineError, match="no budget fits 5 ms"):
        policy.choose(5, TEXT, 16, strict=True)


def test_no_deadline_means_the_largest_budget(policy):
    c = policy.choose(None, TEXT, 16)
    assert (c.budget, c.deadline_met) == (576, None)


def test_bad_objective_is_an_error(policy):
    with pytest.raises(ValueError, match="objective"):
        policy.choose(50, TEXT, 16, objective="fast")


def _observe(policy, factors, load=0):
    for f in factors:
        raw = policy.raw(144, TEXT, 10)
        policy.observe(144, TEXT, 10, {s: ms * f for s, ms in raw.items()}, load=load)


def test_the_correction_moves_the_choice_when_the_device_slows_down_and_back(policy):
    assert policy.choose(50, TEXT, 16).budget == 144
    _observe(policy, [2.0] * 64)  # the device became twice as slow (throttling, a neighbour)
    assert policy.corrections()["ttft"] == pytest.approx(2.0)
    assert policy.choose(50, TEXT, 16).budget == 36
    _observe(policy, [1.0] * 64)  # and recovered: the old observations age out of the window
    assert policy.choose(50, TEXT, 16).budget == 144


def test_the_correction_moves_the_choice_up_when_faster(policy):
    assert policy.choose(30, TEXT, 16).budget == 36
    _observe(policy, [0.5] * MIN_SAMPLES)
    assert policy.choose(30, TEXT, 16).budget == 144


def test_it_predicts_a_high_quantile_not_the_median(policy):
    # 19 in 20 requests at the profile's speed, 1 in 20 twice as slow: p95 sits in the slow tail
    _observe(policy, [1.0] * 19 + [2.0] + [1.0] * 19 + [2.0])
    # 40 ratios, 38 of 1.0 then 2 of 2.0: the 0.95 quantile interpolates 5 % of the way into the tail
    assert policy.corrections()["ttft"] == pytest.approx(1.05)
    assert Policy(policy.profile, BUDGETS, quantile=0.5).corrections()["ttft"] == 1.0


def test_few_observations_do_not_count_yet(policy):
    _observe(policy, [3.0] * (MIN_SAMPLES - 1))
    assert policy.corrections()["ttft"] == 1.0
    _observe(policy, [3.0])
    assert policy.corrections()["ttft"] == pytest.approx(3.0)


def test_load_levels_learn_separately_and_borrow_by_processor_sharing(policy):
    # nothing seen under load: one other request in flight doubles the prediction
    assert policy.corrections(load=1)["ttft"] == 2.0
    assert policy.choose(50, TEXT, 16, load=1).budget == 36
    assert "1 other request(s) in flight" in policy.choose(50, TEXT, 16, load=1).reason
    _observe(policy, [1.2] * MIN_SAMPLES)  # uncontended: 1.2 -> borrowed at load 2 as 3 x 1.2
    assert policy.corrections(load=2)["ttft"] == pytest.approx(3.6)
    _observe(policy, [1.5] * MIN_SAMPLES, load=2)  # measured under load 2: its own numbers win
    assert policy.corrections(load=2)["ttft"] == pytest.approx(1.5)
    assert policy.corrections(load=0)["ttft"] == pytest.approx(1.2)
    assert policy.corrections(load=9)["ttft"] == pytest.approx(1.5 * 4 / 3)  # 3+ is one level


def test_decode_is_corrected_on_its_own(policy):
    raw = policy.raw(144, TEXT, 10)
    for _ in range(MIN_SAMPLES):
        policy.observe(144, TEXT, 10, {**raw, "decode": raw["decode"] * 3})
    assert policy.corrections() == {"ttft": 1.0, "decode": pytest.approx(3.0)}
    assert policy.choose(50, TEXT, 16, objective="ttft").budget == 144


def test_quantile_and_window_are_checked(synthetic_profile):
    with pytest.raises(ValueError, match="quantile"):
        Policy(synthetic_profile, BUDGETS, quantile=1.0)
    with pytest.raises(ValueError, match="window"):
        Policy(synthetic_profile, BUDGETS, window=2)


def _simulate(policy, latency, n=600, seed=0):
    """Requests on a device whose stage times vary (lognormal) and slow down with load
    (1 + load: processor sharing); each measured time is fed back. Returns the met fraction
    over the second half (after learning) and the mean budget."""
    import numpy as np

    rng = np.random.default_rng(seed)
    met, budgets = [], []
    for i in range(n):
        load = int(rng.integers(0, 3))  # 0, 1 or 2 other requests in flight
        c = policy.choose(latency, TEXT, 16, load=load)
        factor = (1 + load) * rng.lognormal(0.0, 0.25)
        raw = policy.raw(c.budget, TEXT, 16)
        measured = {s: ms * factor for s, ms in raw.items()}
        policy.observe(c.budget, TEXT, 16, measured, load=load)
        if i >= n // 2:
            met.append(measured["preprocess"] + measured["vision"] + measured["prefill"] <= latency)
            budgets.append(c.budget)
    return sum(met) / len(met), sum(budgets) / len(budgets)


def test_under_contention_the_quantile_policy_keeps_its_deadlines_and_the_median_does_not(synthetic_profile):
    p95, mean_budget = _simulate(Policy(synthetic_profile, BUDGETS), latency=60.0)
    p50, _ = _simulate(Policy(synthetic_profile, BUDGETS, quantile=0.5), latency=60.0)
    assert p95 >= 0.94  # planned for 95 % (measured 0.957 with this seed)
    assert p50 <= 0.85  # a median prediction misses about half of the close calls (0.817)
    assert mean_budget > 1  # and it does not get there by always serving the smallest
