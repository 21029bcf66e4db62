"""runtime.llm.Decoder on its own: the IO contract it checks when loading, scoring, timeouts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.bundle import verify_bundle
from runtime.llm import Decoder, GenerationTimeout, SamplingParams

IDS = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module")
def spec(tiny_bundle):
    return verify_bundle(tiny_bundle).llm


def load(bundle, spec):
    return Decoder.load(bundle, spec, ["CPUExecutionProvider"], 256)


def test_timeout_s_stops_decoding(tiny_bundle, spec):
    dec = load(tiny_bundle, spec)
    gen = dec.start(dec.embed(IDS), SamplingParams(max_new_tokens=50), timeout_s=0.0)
    with pytest.raises(GenerationTimeout, match="timed out after 1 tokens"):
        list(gen)
    assert gen.finish_reason == "timeout"
    long = dec.start(dec.embed(IDS), SamplingParams(max_new_tokens=3), timeout_s=60.0)
    assert len(list(long)) == 3 and long.finish_reason == "length"


def test_logits_score_every_position_and_match_the_decode_loop(tiny_bundle, spec):
    dec = load(tiny_bundle, spec)
    scores = dec.logits(dec.embed(IDS))  # [S, V]
    assert scores.shape == (len(IDS), spec.vocab_size)
    first = next(iter(dec.start(dec.embed(IDS), SamplingParams(max_new_tokens=1))))
    assert first == int(np.argmax(scores[-1]))


def test_a_manifest_that_disagrees_with_the_graph_is_refused(tiny_bundle, spec):
    with pytest.raises(
        ValueError,
        match=r"does not follow the bundle contract \(2 layers\): no output kv.0.key; no output kv.1.key",
    ):
        load(tiny_bundle, dataclasses.replace(spec, present_key="kv.{i}.key"))
    with pytest.raises(ValueError, match=f"no input past_key_values.{spec.num_layers}.key"):
        load(tiny_bundle, dataclasses.replace(spec, num_layers=spec.num_layers + 1))


def test_an_embedding_table_of_another_dtype_is_refused(tiny_bundle, spec, tmp_path):
    import shutil

    root = shutil.copytree(tiny_bundle, tmp_path / "b")
    table = np.load(root / spec.embed_tokens)
    np.save(root / spec.embed_tokens, table.astype(np.float16))
    with pytest.raises(ValueError, match="float16, the decoder's inputs_embeds is float32"):
        load(root, spec)
