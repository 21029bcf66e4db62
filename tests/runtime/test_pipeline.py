"""Pipeline behaviour on the tiny bundle: sampling, stops, streaming, escalation, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.llm import SamplingParams, pick_token
from runtime.policy import DeadlineError
from runtime.profile import ProfileError

PROMPT = "What is in the picture?"


def test_pick_token_greedy_and_top_p():
    logits = np.array([0.0, 3.0, 1.0, 2.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert pick_token(logits, 0.0, 1.0, rng) == 1
    assert {pick_token(logits, 1.0, 1e-6, rng) for _ in range(20)} == {1}  # top-p keeps only the top
    seen = {pick_token(logits, 5.0, 1.0, rng) for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_sampling_is_reproducible_with_a_seed(pipe, image_bytes):
    kw = dict(tokens=9, max_new_tokens=10, temperature=1.5, top_p=0.95)
    a = pipe.ask(image_bytes[0], PROMPT, seed=1, **kw).token_ids
    b = pipe.ask(image_bytes[0], PROMPT, seed=1, **kw).token_ids
    c = [pipe.ask(image_bytes[0], PROMPT, seed=s, **kw).token_ids for s in (2, 3, 4)]
    assert a == b
    assert any(x != a for x in c)


def test_max_new_tokens_and_finish_reason(pipe, image_bytes):
    r = pipe.ask(image_bytes[0], PROMPT, tokens=1, max_new_tokens=3)
    assert len(r.token_ids) <= 3
    assert r.finish_reason == ("length" if len(r.token_ids) == 3 else "stop")


def test_stop_token_ids_end_the_generation(pipe, image_bytes):
    full = pipe.ask(image_bytes[0], PROMPT, tokens=36, max_new_tokens=12).token_ids
    stop = full[3]
    gen = pipe.decoder.start(
        pipe.embeddings(pipe.prompt_ids(PROMPT), pipe.encode(image_bytes[0], [36]).features[36]),
        SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)),
    )
    got = list(gen)
    assert got == full[: full.index(stop)] and gen.finish_reason == "stop"


def test_stop_string_cuts_the_answer(pipe, image_bytes):
    full = pipe.ask(image_bytes[1], PROMPT, tokens=144, max_new_tokens=12)
    text = full.answer.replace("\ufffd", "")
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"answer too short to cut: {full.answer!r}"
    r = pipe.ask(image_bytes[1], PROMPT, tokens=144, max_new_tokens=12, stop=[stop])
    assert r.answer == full.answer[: full.answer.find(stop)]
    assert stop not in r.answer and r.finish_reason == "stop"


def test_stream_deltas_add_up_to_the_answer(pipe, image_bytes):
    ref = pipe.ask(image_bytes[0], PROMPT, tokens=36, max_new_tokens=12)
    ans = pipe.stream(image_bytes[0], PROMPT, tokens=36, max_new_tokens=12)
    deltas = list(ans)
    assert len(deltas) >= 2
    assert "".join(deltas) == ref.answer == ans.result.answer
    assert ans.result.token_ids == ref.token_ids


def test_an_answer_owns_its_generator(pipe, image_bytes):
    ans = pipe.stream(image_bytes[0], PROMPT, tokens=36, max_new_tokens=12)
    assert (ans.budget, ans.options.max_new_tokens, ans.result) == (36, 12, None)  # known before decoding
    deltas = iter(ans)
    first = next(deltas)
    assert first and ans.result is None
    ans.close()  # stops decoding: no result, and nothing more to iterate
    assert list(deltas) == [] and list(ans) == [] and ans.result is None
    done = pipe.stream(image_bytes[0], PROMPT, tokens=36, max_new_tokens=12)
    text = "".join(done)
    assert done.result.answer == text and list(done) == []  # exhausted once; the result stays


def test_escalation_reuses_one_vision_pass(pipe, image_bytes, monkeypatch):
    calls = []
    real = pipe.vision.encode
    monkeypatch.setattr(pipe.vision, "encode", lambda px, b: calls.append(list(b)) or real(px, b))
    small, large = pipe.escalate(image_bytes[0], PROMPT, budgets=(144, 9), max_new_tokens=8)
    assert calls == [[9, 144]]  # one tower pass for both budgets
    assert (small.budget, large.budget) == (9, 144)
    assert large.vision_reused and not small.vision_reused
    monkeypatch.undo()
    for r in (small, large):
        assert r.token_ids == pipe.ask(image_bytes[0], PROMPT, tokens=r.budget, max_new_tokens=8).token_ids


def test_concurrent_requests_do_not_share_cache_state(pipe, image_bytes):
    jobs = [(image_bytes[i % 2], t) for i, t in enumerate((576, 9, 144, 1, 36, 576))]
    want = [pipe.ask(im, PROMPT, tokens=t, max_new_tokens=10).token_ids for im, t in jobs]
    got: list = [None] * len(jobs)

    def run(i: int) -> None:
        im, t = jobs[i]
        got[i] = pipe.ask(im, PROMPT, tokens=t, max_new_tokens=10).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == want


def test_unknown_budget_lists_the_valid_ones(pipe, image_bytes):
    with pytest.raises(ValueError, match="valid budgets: 576, 144, 36, 9, 1"):
        pipe.ask(image_bytes[0], PROMPT, tokens=100)


def test_latency_budget_without_profile_says_what_to_do(pipe, image_bytes):
    assert pipe.policy is None
    with pytest.raises(ProfileError, match="python -m runtime profile"):
        pipe.ask(image_bytes[0], PROMPT, latency_ms=100)


def test_no_latency_budget_serves_the_largest(pipe, image_bytes):
    r = pipe.ask(image_bytes[0], PROMPT, max_new_tokens=2)
    assert r.budget == 576 and r.deadline_met is None


def test_policy_with_a_profile(pipe, image_bytes, synthetic_profile):
    # Seconds, not ms: the real preprocessing time (counted as spent) cannot move the choice.
    synthetic_profile.vision_ms = {
        t: {k: v * 1000 for k, v in d.items()} for t, d in synthetic_profile.vision_ms.items()
    }
    synthetic_profile.prefill_ms_per_token *= 1000
    pipe.use_profile(synthetic_profile)
    text = len(pipe.prompt_ids(PROMPT)) - 1
    ttft = {t: pipe.policy.predict(t, text, 2, spent_ms=0.0).ttft_ms for t in pipe.budgets}
    # earlier tests asked this image: its cached prefixes would (rightly) make bigger budgets fit
    with pipe.prefix_cache_off():
        _uncached_choices(pipe, image_bytes, ttft)
    assert pipe.policy is None


def _uncached_choices(pipe, image_bytes, ttft):
    try:
        latency = (ttft[36] + ttft[144]) / 2
        r = pipe.ask(image_bytes[0], PROMPT, latency_ms=latency, max_new_tokens=2)
        assert r.budget == 36 and r.predicted_deadline_met is True
        assert set(r.predicted_ms) >= {"vision", "prefill", "ttft"} and r.measured_ms["ttft"] > 0
        # candidates add this request's measured preprocessing to every budget alike: compare gaps only
        gap = r.candidates_ms[144] - r.candidates_ms[36]
        assert gap == pytest.approx(ttft[144] - ttft[36], rel=1e-6) and gap > 0
        r = pipe.ask(image_bytes[0], PROMPT, latency_ms=1, max_new_tokens=2)
        assert r.budget == 1 and r.predicted_deadline_met is False
        with pytest.raises(DeadlineError):
            pipe.ask(image_bytes[0], PROMPT, latency_ms=1, strict=True)
    finally:
        pipe.reload_profile()  # back to the session bundle's state: no profile


def test_requests_in_flight_are_counted_and_reach_the_policy(pipe, image_bytes):
    assert pipe.inflight == 0
    first = pipe.stream(image_bytes[0], PROMPT, tokens=1, max_new_tokens=2)
    assert pipe.inflight == 1  # started, not yet answered
    second = pipe.ask(image_bytes[0], PROMPT, tokens=1, max_new_tokens=2)
    assert second.load == 1 and pipe.inflight == 1
    first.close()
    assert pipe.inflight == 0
    for _ in pipe.stream(image_bytes[0], PROMPT, tokens=1, max_new_tokens=2):
        pass
    assert pipe.inflight == 0
    with pytest.raises(ValueError):  # a request that fails before its answer leaves the count
        pipe.stream(b"not an image", PROMPT, tokens=1)
    assert pipe.inflight == 0


def test_time_waited_before_the_pipeline_counts_against_the_deadline(pipe, image_bytes):
    ans = pipe.stream(image_bytes[0], PROMPT, tokens=1, latency_ms=1000, max_new_tokens=2, waited_ms=5000.0)
    for _ in ans:
        pass
    r = ans.result
    assert r.measured_ms["waited"] == 5000.0 and r.measured_ms["ttft"] >= 5000.0
    assert r.deadline_met is False
