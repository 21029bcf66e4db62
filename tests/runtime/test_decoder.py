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


def test_shared_kv_buffers_give_the_copy_loops_tokens_and_update_in_place(tiny_bundle, spec):
    """A GroupQueryAttention decoder (onnxruntime-genai) decodes into one K/V buffer per layer,
    bound as past and present: same greedy tokens and logits as the per-step copy, and the
    present output is the very buffer bound at the start (nothing allocated per step)."""
    dec = load(tiny_bundle, spec)
    assert spec.exporter == "onnxruntime-genai" and dec.shared_kv
    rng = np.random.default_rng(0)
    for n in (1, 7, 90):
        ids = rng.integers(4, spec.vocab_size, n)
        got = {}
        for shared in (False, True):
            dec.shared_kv = shared
            gen = dec.start(dec.embed(ids), SamplingParams(max_new_tokens=12, stop_token_ids=()))
            got[shared] = list(gen)
        assert got[True] == got[False] and len(got[True]) == 12, n
    dec.shared_kv = False
    want = dec.logits(dec.embed(IDS))
    dec.shared_kv = True
    np.testing.assert_array_equal(dec.logits(dec.embed(IDS)), want)
    gen = dec.start(dec.embed(IDS), SamplingParams(max_new_tokens=6, stop_token_ids=()))
    it = iter(gen)
    next(it)
    ptr = gen.io.get_outputs()[1].data_ptr()  # present.0.key after the prefill
    list(it)
    assert gen.io.get_outputs()[1].data_ptr() == ptr and gen.length == len(IDS) + 5


def test_a_standard_attention_decoder_keeps_the_copy_loop(tiny_bundle, spec):
    assert not load(tiny_bundle, dataclasses.replace(spec, exporter="torch-dynamo")).shared_kv


def test_the_head_runs_on_the_last_position_unless_asked_for_more(tiny_bundle, spec):
    """export.decoder.last_logits_only: generation feeds num_logits_to_keep = 1 (the prefill skips
    S - 1 rows of the LM head); S gives every position, the same values."""
    import onnxruntime as ort

    from runtime.llm import KEEP

    dec = load(tiny_bundle, spec)
    assert dec.has_keep
    sess = ort.InferenceSession(str(tiny_bundle / spec.decoder), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    feed = {"inputs_embeds": dec.embed(IDS), "attention_mask": np.ones((1, len(IDS)), np.int64)}
    feed |= {n: empty for i in sess.get_inputs() if (n := i.name).startswith("past_key_values")}
    feed |= {n: np.arange(len(IDS))[None] for i in sess.get_inputs() if (n := i.name) == "position_ids"}
    last = sess.run(["logits"], feed | {KEEP: np.array([1])})[0]
    every = sess.run(["logits"], feed | {KEEP: np.array([len(IDS)])})[0]
    assert last.shape == (1, 1, spec.vocab_size) and every.shape == (1, len(IDS), spec.vocab_size)
    np.testing.assert_allclose(last[0, 0], every[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dec.logits(dec.embed(IDS)), every[0], rtol=1e-5, atol=1e-5)


def test_last_logits_only_leaves_a_graph_without_a_matmul_head_alone():
    from onnx import TensorProto, helper

    from export.decoder import KEEP, last_logits_only

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [y]))
    assert not last_logits_only(model)
    assert KEEP not in [i.name for i in model.graph.input]
