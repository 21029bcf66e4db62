"""The budget policy on synthetic profiles (no bundle, no timing)."""

from __future__ import annotations

import pytest

from runtime.policy import DeadlineError, Policy

BUDGETS = (576, 144, 36, 9, 1)
TEXT = 40  # text tokens of the prompt


@pytest.fixture
def policy(synthetic_profile) -> Policy:
    return Policy(synthetic_profile, BUDGETS, alpha=0.5)


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


def _observe(policy, factor, n=8):
    for _ in range(n):
        raw = policy.raw(144, TEXT, 10)
        policy.observe(144, TEXT, 10, {s: ms * factor for s, ms in raw.items()})


def test_ewma_correction_moves_the_choice_when_the_device_slows_down(policy):
    assert policy.choose(50, TEXT, 16).budget == 144
    _observe(policy, 2.0)  # the device became twice as slow (throttling, a neighbour)
    assert policy.corrections()["vision"] == pytest.approx(2.0, rel=0.01)
    assert policy.choose(50, TEXT, 16).budget == 36
    _observe(policy, 1.0)  # and recovered
    assert policy.choose(50, TEXT, 16).budget == 144


def test_ewma_correction_moves_the_choice_up_when_faster(policy):
    assert policy.choose(30, TEXT, 16).budget == 36
    _observe(policy, 0.5)
    assert policy.choose(30, TEXT, 16).budget == 144


def test_one_outlier_moves_the_correction_only_partly(policy):
    _observe(policy, 3.0, n=1)
    assert policy.corrections()["prefill"] == pytest.approx(1.0 + 0.5 * (3.0 - 1.0))


def test_alpha_is_checked(synthetic_profile):
    with pytest.raises(ValueError, match="alpha"):
        Policy(synthetic_profile, BUDGETS, alpha=0)
