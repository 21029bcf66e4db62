"""The decoder: fp32 greedy == transformers, int8/int4 agreement floors, IO contract, sizes.

Every decoder here runs through runtime.llm.Decoder, the code that ships."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.common import ExportError
from export.gates import runtime_greedy, text_prompts, torch_greedy
from export.quant import QUANTIZATIONS
from runtime.llm import Decoder


def decoder(root, section):
    return Decoder.load(root, section, ["CPUExecutionProvider"], 2048)


def greedy_pair(src, root, section, prompt=0):
    ids = text_prompts(src.tokenizer, src.model.cfg.template, src.model.cfg.bos_token_id)[prompt]
    return runtime_greedy(decoder(root, section), ids), torch_greedy(src.model.language_model, ids)


def test_fp32_genai_greedy_equals_transformers(src, shared_bundle):
    root, m = shared_bundle
    assert m.llm.exporter == "onnxruntime-genai"
    ours, theirs = greedy_pair(src, root, m.llm, prompt=1)
    assert len(ours) == 20 and ours == theirs
    rec = m.llm.quantization["agreement"]
    assert rec["greedy_equal"] and rec["top1"] == 1.0 and rec["max_abs_logit_err"] < 1e-4
    # recorded beside the gated questions: plain text, and the benchmark's questions after an image
    assert set(rec["sets"]) == {"paragraphs", "images_576", "images_36"}
    for name, got in rec["sets"].items():
        assert got["positions"] > 20 and got["top1"] == 1.0 and got["kl"] < 1e-6, name


def test_fp32_dynamo_greedy_equals_transformers(src, dynamo_decoders):
    root, section = dynamo_decoders["fp32"]
    assert section.exporter == "torch-dynamo"
    ours, theirs = greedy_pair(src, root, section, prompt=2)
    assert ours == theirs


def test_llm_added_to_a_bundle_updates_its_rebuild_command(per_budget_bundle):
    m = per_budget_bundle[1]
    cmd = m.build["command"]
    assert "--tokens 36,1 --layout per-budget --opset 18 --preprocess host --quant int8 --target cpu" in cmd
    assert cmd.endswith("--block-size 32 --force") and m.build["llm"]["quant"] == "int8"


def test_int8_and_int4_meet_the_floor(per_budget_bundle, dynamo_decoders):
    int8 = per_budget_bundle[1].llm.quantization
    int4 = dynamo_decoders["int4"][1].quantization
    assert per_budget_bundle[1].llm.quant == "int8" and int8["method"] == QUANTIZATIONS["int8"].method
    assert int8["agreement"]["top1"] >= QUANTIZATIONS["int8"].floor == 0.85
    assert dynamo_decoders["int4"][1].quant == "int4" and int4["block_size"] == 32
    assert int4["agreement"]["top1"] >= QUANTIZATIONS["int4"].floor == 0.65
    assert int8["agreement"]["runtime"] == "runtime.llm.Decoder"
    for q in (int8, int4):
        assert q["agreement"]["positions"] > 100 and 0 < q["agreement"]["max_abs_logit_err"] < 1.0
        assert all(0 < v["kl"] < 1.0 for v in q["agreement"]["sets"].values())
    # 4 bits lose more than 8, on every recorded set
    assert all(int4["agreement"]["sets"][k]["kl"] > v["kl"] for k, v in int8["agreement"]["sets"].items())


def test_quantized_graphs_hold_the_quantized_ops(per_budget_bundle, dynamo_decoders):
    def nbits(path):
        graph = onnx.load(str(path / "llm/decoder.onnx"), load_external_data=False).graph
        return [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]

    # accuracy_level 4 on the CPU: without it onnxruntime dequantizes 8-bit weights on every call
    int8 = nbits(per_budget_bundle[0])
    assert int8 and all(a["bits"] == 8 and a["block_size"] == 32 and a["accuracy_level"] == 4 for a in int8)
    # int4 (export.quant.INT4): asymmetric 4-bit blocks, the LM head (the MatMul of `logits`) in 8 bits
    graph = onnx.load(str(dynamo_decoders["int4"][0] / "llm/decoder.onnx"), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    head = producer["logits"]
    while head.op_type != "MatMulNBits":
        head = producer[head.input[0]]
    int4 = [(n.name, {a.name: a.i for a in n.attribute}) for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(int4) > 1 and all(a["block_size"] == 32 and a["accuracy_level"] == 4 for _, a in int4)
    assert {name: a["bits"] for name, a in int4} == {name: 8 if name == head.name else 4 for name, _ in int4}
    zero_points = {
        n.name: len(n.input) > 3 and bool(n.input[3]) for n in graph.node if n.op_type == "MatMulNBits"
    }
    assert all(zero_points.values()), zero_points  # asymmetric: every block has its zero point
    assert per_budget_bundle[1].llm.quantization["accuracy_level"] == 4


def test_decoder_io_contract(shared_bundle, dynamo_decoders):
    """Both exporters' graphs pass the runtime's own IO check; the manifest carries no copy of it."""
    for root, section in ((shared_bundle[0], shared_bundle[1].llm), dynamo_decoders["fp32"]):
        dec = decoder(root, section)
        assert not dec.has_position_ids and dec.kv_dtype is np.float32
        assert (section.num_kv_heads, section.head_dim, section.hidden_size) == (2, 32, 128)
    raw = json.loads((shared_bundle[0] / "manifest.json").read_text())["llm"]
    assert not {"inputs", "outputs", "has_position_ids", "kv_dtype"} & set(raw)


def test_runtime_refuses_a_decoder_off_the_contract(shared_bundle):
    """A manifest that disagrees with the graph (more layers than it has): a clear error."""
    import dataclasses

    root, m = shared_bundle
    wrong = dataclasses.replace(m.llm, num_layers=m.llm.num_layers + 1)
    i = m.llm.num_layers
    with pytest.raises(
        ValueError, match=f"does not follow the bundle contract.*no input past_key_values.{i}.key"
    ):
        decoder(root, wrong)


def test_kv_cache_step_matches_full_prefill(src, dynamo_decoders):
    """Runtime decoding: prefill 5 tokens then 1 with the cache == logits of the 6-token prefill."""
    from runtime.llm import Generation, SamplingParams

    root, section = dynamo_decoders["fp32"]
    dec = decoder(root, section)
    ids = [1, 40, 41, 42, 43, 44]
    full = dec.logits(dec.embed(ids))  # [6, V]
    gen = Generation(dec, dec.embed(ids[:5]), SamplingParams(max_new_tokens=2))
    gen._run(gen.embeds)
    step = gen._run(dec.embed(ids[5:]))  # [V]
    assert gen.length == 6
    np.testing.assert_allclose(step, full[-1], atol=1e-4)


def test_embedding_table_and_sizes(src, shared_bundle, per_budget_bundle, dynamo_decoders):
    table = np.load(shared_bundle[0] / "llm/embed_tokens.npy")
    ref = src.model.language_model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table, ref)
    genai_fp32 = shared_bundle[1].llm.quantization["bytes"]
    genai_int8 = per_budget_bundle[1].llm.quantization["bytes"]
    dynamo_fp32 = dynamo_decoders["fp32"][1].quantization["bytes"]
    dynamo_int4 = dynamo_decoders["int4"][1].quantization["bytes"]
    assert genai_int8 < genai_fp32 / 2 and dynamo_int4 < dynamo_fp32 / 2


def test_a_decoder_below_its_floor_fails_the_gate(src, dynamo_decoders, monkeypatch):
    import export.gates as eg
    from export.gates import llm_gate

    root, section = dynamo_decoders["int4"]
    monkeypatch.setitem(eg.__dict__, "quantization", lambda name: type("Q", (), {"floor": 1.01})())
    with pytest.raises(ExportError, match="int4 decoder below its quality floor.*floor 1.01"):
        llm_gate(root, section, src.model, src.tokenizer, "cpu")


def test_llm_cli_needs_an_existing_bundle(tmp_path, capsys):
    from export.cli import llm_main as main

    assert main(["--demo-tiny", "--out", str(tmp_path / "none")]) == 2
    assert "python -m export.onnx" in capsys.readouterr().out
    assert main(["--demo-tiny", "--out", str(tmp_path), "--block-size", "24"]) == 2
    assert "power of two" in capsys.readouterr().out


def test_the_gate_records_images_at_the_budgets_the_model_serves():
    from export.gates import gate_budgets

    assert gate_budgets((576, 144, 36, 9, 1)) == (576, 36)
    assert gate_budgets((576,)) == (576,)  # the `none` cascade: plain LLaVA
    assert gate_budgets((144, 9)) == (144,)
