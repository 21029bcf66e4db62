"""The KV memory budget: recorded by export, held by running generations, refused past it."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from runtime.llm import KVCacheFull, KVCacheTooSmall, SamplingParams
from runtime.pipeline import Pipeline

MB = 2**20


@pytest.fixture(scope="module")
def budgeted(tiny_bundle):
    """The tiny bundle with the manifest's budget (one request at the full context)."""
    return Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0)


def prompt(pipe, n: int = 20) -> np.ndarray:
    return pipe.decoder.embed(list(range(5, 5 + n)))  # [1, n, D]


def test_export_records_one_full_context(tiny_bundle, budgeted):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    mb = manifest["llm"]["kv_cache_mb"]
    dec = budgeted.decoder
    full = dec.kv_bytes(dec.max_len)
    assert dec.kv_budget.limit == mb * MB
    assert full <= dec.kv_budget.limit < full + MB  # room for one request at the full context


def test_generations_hold_their_cache_until_they_end(budgeted):
    dec = budgeted.decoder
    params = SamplingParams(max_new_tokens=4)
    first = iter(dec.start(prompt(budgeted), params))
    next(first)
    held = dec.kv_budget.reserved
    assert held == dec.kv_bytes(20 + 4)
    for _ in first:  # exhausted: its memory goes back
        pass
    assert dec.kv_budget.reserved == 0
    dropped = dec.start(prompt(budgeted), params)  # started, never iterated, then dropped
    assert dec.kv_budget.reserved == held
    del dropped
    gc.collect()
    assert dec.kv_budget.reserved == 0
    closed = iter(dec.start(prompt(budgeted), params))
    next(closed)
    closed.close()  # a client gone mid-answer
    assert dec.kv_budget.reserved == 0


def test_a_full_budget_refuses_until_a_request_ends(tiny_bundle):
    one = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0, kv_cache_mb=0.0)
    need = one.decoder.kv_bytes(20 + 8)
    tight = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0, kv_cache_mb=1.5 * need / MB)
    dec, params = tight.decoder, SamplingParams(max_new_tokens=8)
    running = iter(dec.start(prompt(tight), params))
    next(running)
    with pytest.raises(KVCacheFull, match="retry shortly"):
        dec.start(prompt(tight), params)
    assert dec.kv_budget.reserved == need  # the refused one took nothing
    running.close()
    again = list(dec.start(prompt(tight), params))  # room again
    assert len(again) >= 1 and dec.kv_budget.reserved == 0
    # no limit: any number at once
    gens = [iter(one.decoder.start(prompt(one), params)) for _ in range(4)]
    for g in gens:
        next(g)
    assert one.decoder.kv_budget.reserved == 4 * need


def test_a_request_over_the_budget_alone_is_refused_with_what_to_do(tiny_bundle, real_images):
    small = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0, kv_cache_mb=0.01)
    with pytest.raises(KVCacheTooSmall, match="lower max_new_tokens.*--kv-cache-mb"):
        small.ask(real_images[0], "What is this?", tokens=1, max_new_tokens=4)
    assert small.decoder.kv_budget.reserved == 0
    with pytest.raises(ValueError, match=">= 0 MB"):
        Pipeline.load(tiny_bundle, threads=1, kv_cache_mb=-1)


def test_server_answers_503_then_serves_and_400_for_one_too_large(tiny_bundle, image_bytes):
    from tests.runtime.test_server import messages, raw, running

    pipe = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0)
    budget = pipe.decoder.kv_budget
    body = json.dumps({"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1}).encode()
    with running(pipe) as srv:
        budget.reserve(budget.limit - 1024, "other requests")  # as if others held it
        status, data = raw(srv, "POST", "/v1/chat/completions", body)
        assert status == 503 and "KV memory budget" in json.loads(data)["error"]["message"]
        budget.release(budget.limit - 1024)
        assert raw(srv, "POST", "/v1/chat/completions", body)[0] == 200
    tiny = Pipeline.load(tiny_bundle, threads=1, prefix_cache_mb=0, kv_cache_mb=0.01)
    with running(tiny) as srv:
        status, data = raw(srv, "POST", "/v1/chat/completions", body)
        err = json.loads(data)["error"]
        assert status == 400 and err["param"] == "max_tokens" and "lower max_new_tokens" in err["message"]
