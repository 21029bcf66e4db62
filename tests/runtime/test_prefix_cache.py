"""runtime.prefix_cache through the Pipeline: a follow-up question about the same frame reuses its
prompt prefix (no vision pass, only its own text prefilled) and answers exactly as uncached."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.prefix_cache import PrefixCache, PrefixEntry, prefix_key

Q1, Q2 = "What is in the picture?", "What colour is it?"


@pytest.fixture(scope="module")
def pipes(tiny_bundle):
    from runtime.pipeline import Pipeline

    return Pipeline.load(tiny_bundle, threads=1), Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0)


def test_a_follow_up_about_the_same_frame_reuses_the_prefix_and_answers_the_same(pipes, real_images):
    cached, plain = pipes
    assert plain.prefix_cache is None and cached.prefix_cache is not None
    frame = np.asarray(real_images[0])
    for tokens in (36, 576):
        image_at = cached.prompt_ids(Q2).index(cached.special["image"])
        first = cached.ask(frame, Q1, tokens=tokens, max_new_tokens=6)
        assert first.prefix_reused <= image_at and not first.vision_reused  # at most the text before it
        follow = cached.ask(frame.copy(), Q2, tokens=tokens, max_new_tokens=6)  # same pixels, new array
        assert follow.prefix_reused == image_at + tokens and follow.vision_reused
        assert follow.measured_ms["vision"] == 0.0
        want = plain.ask(frame, Q2, tokens=tokens, max_new_tokens=6)
        assert follow.token_ids == want.token_ids and follow.answer == want.answer
    stats = cached.prefix_cache.stats()
    assert stats["hits"] == 2 and stats["entries"] == 2


def test_another_image_budget_or_prompt_start_misses(pipes, real_images):
    cached, _ = pipes
    a, b = np.asarray(real_images[0]), np.asarray(real_images[1])
    text = cached.prompt_ids(Q1).index(cached.special["image"])  # positions before the image
    cached.ask(a, Q1, tokens=9, max_new_tokens=2)
    # a frame-prefix miss reuses only the text before the image (the template's, cached once)
    assert cached.ask(b, Q1, tokens=9, max_new_tokens=2).prefix_reused == text  # another image
    assert cached.ask(a, Q1, tokens=1, max_new_tokens=2).prefix_reused == text  # another budget
    one_pixel = a.copy()
    one_pixel[0, 0, 0] ^= 1
    assert cached.ask(one_pixel, Q1, tokens=9, max_new_tokens=2).prefix_reused == text
    system = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q1}]
    assert cached.ask(a, system, tokens=9, max_new_tokens=2).prefix_reused == 0  # another prompt start
    assert cached.ask(a, Q2, tokens=9, max_new_tokens=2).prefix_reused == text + 9


def test_the_text_before_the_image_is_computed_once_and_answers_the_same(tiny_bundle, real_images):
    """The template's text before the image: prefilled by the first request, reused by every later
    one (another frame, budget or question; also with the frame cache off), the answers unchanged."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0)  # the frame cache off
    assert pipe.prefix_cache is None and pipe.text_prefix is not None
    text = pipe.prompt_ids(Q1).index(pipe.special["image"])
    a, b = np.asarray(real_images[0]), np.asarray(real_images[1])
    first = pipe.ask(a, Q1, tokens=36, max_new_tokens=6)
    assert first.prefix_reused == 0 and len(pipe.text_prefix) == 1
    later = [pipe.ask(b, Q2, tokens=t, max_new_tokens=6) for t in (36, 1)]
    assert [r.prefix_reused for r in later] == [text, text]
    pipe.text_prefix = None  # the reference: every prompt prefilled whole
    want = [pipe.ask(b, Q2, tokens=t, max_new_tokens=6) for t in (36, 1)]
    assert [w.prefix_reused for w in want] == [0, 0]
    assert [r.token_ids for r in later] == [w.token_ids for w in want]


def entry(nbytes_each: int) -> PrefixEntry:
    k = np.zeros((1, 1, nbytes_each // 8, 1), np.float32)  # k and v: nbytes_each / 2 each
    return PrefixEntry(np.zeros((0, 1), np.float32), ((k, k.copy()),))


def test_eviction_keeps_the_cache_under_its_byte_bound():
    cache = PrefixCache(max_bytes=1000)
    for i in range(5):
        assert cache.put(f"k{i}", entry(400))
        assert cache.bytes <= 1000
    assert len(cache) == 2 and cache.get("k4") is not None and cache.get("k0") is None
    assert cache.stats()["evictions"] == 3
    assert not cache.put("big", entry(2000)) and cache.bytes <= 1000  # larger than the bound: not kept
    with pytest.raises(ValueError, match="size >= 0"):
        PrefixCache(-1)


def test_the_key_covers_pixels_budget_and_prompt_start():
    x = np.zeros((1, 4, 4, 3), np.uint8)
    k = prefix_key(x, 36, [1, 2])
    assert k == prefix_key(x.copy(), 36, [1, 2])
    assert len({k, prefix_key(x, 9, [1, 2]), prefix_key(x, 36, [1, 3]), prefix_key(x + 1, 36, [1, 2])}) == 4


def test_the_policy_counts_a_cached_prefix_a_cached_576_fits_where_an_uncached_36_does_not(
    tiny_bundle, real_images, synthetic_profile
):
    """Synthetic profile: an uncached 576 is ~100 ms to the first token, an uncached 36 ~18 ms;
    with this frame's 576 prefix cached, 576 needs no vision pass and only the question prefilled."""
    from runtime.pipeline import Pipeline
    from runtime.policy import Policy

    pipe = Pipeline.load(tiny_bundle, threads=1)
    pipe.policy = Policy(synthetic_profile, pipe.budgets)
    frame = np.asarray(real_images[0])
    cold = pipe.ask(frame, Q1, latency_ms=15, max_new_tokens=2)
    assert cold.budget < 36 and "cached" not in cold.reason
    pipe.ask(frame, Q1, tokens=576, max_new_tokens=2)  # the frame's 576-token prefix, now cached
    warm = pipe.ask(frame, Q2, latency_ms=15, max_new_tokens=2)
    assert warm.budget == 576 and warm.vision_reused, warm.reason
    assert "prefix is cached" in warm.reason
    other = pipe.ask(np.asarray(real_images[1]), Q2, latency_ms=15, max_new_tokens=2)
    assert other.budget < 36  # another frame: nothing cached, the uncached ladder as before
