"""The int8 decoder bundle (what `make demo` serves) runs through the same runtime."""

from __future__ import annotations

import pytest

from runtime.pipeline import Pipeline

PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def int8_pipe(tmp_path_factory):
    from export import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path_factory.mktemp("int8") / "bundle", quant="int8")
    return Pipeline.load(bundle, threads=1)


def test_int8_bundle_answers_every_budget_close_to_fp32(int8_pipe, pipe, image_bytes):
    assert int8_pipe.manifest.llm.quant == "int8"
    first_same = 0
    for im in image_bytes:
        for t in int8_pipe.budgets:
            q = int8_pipe.ask(im, PROMPT, tokens=t, max_new_tokens=4)
            f = pipe.ask(im, PROMPT, tokens=t, max_new_tokens=4)
            assert q.budget == t and all(0 <= i < int8_pipe.manifest.llm.vocab_size for i in q.token_ids)
            first_same += q.token_ids[:1] == f.token_ids[:1]
    assert first_same >= 7, f"int8 first token agrees with fp32 in {first_same}/10 cases"


def test_int8_streams(int8_pipe, image_bytes):
    ans = int8_pipe.stream(image_bytes[0], PROMPT, tokens=36, max_new_tokens=6)
    assert "".join(ans) == ans.result.answer
