"""The decoder: fp32 greedy == transformers, int8/int4 agreement floors, IO contract, sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.common import ExportError
from export.llm import check_combo
from export.llm_check import FLOORS, OrtDecoder, onnx_greedy, prompt_ids, torch_greedy


def decoder(root, section):
    return OrtDecoder(root / section.decoder, section.num_layers, section.num_kv_heads, section.head_dim,
                      "CPUExecutionProvider")  # fmt: skip


def greedy_pair(src, root, section, prompt=0):
    table = np.load(root / section.embed_tokens)
    ids = prompt_ids(src.tokenizer, src.model.cfg.template, src.model.cfg.bos_token_id)[prompt]
    return onnx_greedy(decoder(root, section), table, ids), torch_greedy(src.model.language_model, ids)


def test_fp32_genai_greedy_equals_transformers(src, shared_bundle):
    root, m = shared_bundle
    assert m.llm.exporter == "onnxruntime-genai"
    ours, theirs = greedy_pair(src, root, m.llm, prompt=1)
    assert len(ours) == 20 and ours == theirs
    rec = m.llm.quantization["agreement"]
    assert rec["greedy_equal"] and rec["top1"] == 1.0 and rec["max_abs_logit_err"] < 1e-4


def test_fp32_dynamo_greedy_equals_transformers(src, dynamo_decoders):
    root, section = dynamo_decoders["fp32"]
    assert section.exporter == "torch-dynamo"
    ours, theirs = greedy_pair(src, root, section, prompt=2)
    assert ours == theirs


def test_llm_added_to_a_bundle_updates_its_rebuild_command(per_budget_bundle):
    cmd = per_budget_bundle[1].build["command"]
    assert (
        "--layout per-budget --opset 18 --llm int8 --target cpu --exporter auto --block-size 32 --force"
        in cmd
    )


def test_int8_and_int4_meet_the_floor(per_budget_bundle, dynamo_decoders):
    int8 = per_budget_bundle[1].llm.quantization
    int4 = dynamo_decoders["int4"][1].quantization
    assert int8["method"] == "int8-matmulnbits" and int8["agreement"]["top1"] >= FLOORS["int8"] == 0.85
    assert int4["method"] == "int4-matmulnbits" and int4["block_size"] == 32
    assert int4["agreement"]["top1"] >= FLOORS["int4"] == 0.65
    for q in (int8, int4):
        assert q["agreement"]["positions"] > 100 and 0 < q["agreement"]["max_abs_logit_err"] < 1.0


def test_quantized_graphs_hold_the_quantized_ops(per_budget_bundle, dynamo_decoders):
    def nbits(path):
        graph = onnx.load(str(path / "llm/decoder.onnx"), load_external_data=False).graph
        return [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]

    int8 = nbits(per_budget_bundle[0])  # weight-only int8: float activations
    assert int8 and all(a["bits"] == 8 and a["block_size"] == 32 for a in int8)
    int4 = nbits(dynamo_decoders["int4"][0])
    assert int4 and all(a["bits"] == 4 and a["block_size"] == 32 for a in int4)


def test_decoder_io_contract(shared_bundle, dynamo_decoders):
    for section in (shared_bundle[1].llm, dynamo_decoders["fp32"][1]):
        layers = section.num_layers
        assert section.inputs[:2] == ["inputs_embeds", "attention_mask"] or set(section.inputs[:2]) == {
            "inputs_embeds", "attention_mask"}  # fmt: skip
        assert {section.past_key.format(i=i) for i in range(layers)} <= set(section.inputs)
        assert {section.present_value.format(i=i) for i in range(layers)} <= set(section.outputs)
        assert "logits" in section.outputs and not section.has_position_ids
        assert (section.num_kv_heads, section.head_dim, section.hidden_size) == (2, 32, 128)


def test_kv_cache_step_matches_full_prefill(src, dynamo_decoders):
    """Prefill 5 tokens then 1 with the cache == logits of the 6-token prefill."""
    root, section = dynamo_decoders["fp32"]
    dec, table = decoder(root, section), np.load(root / section.embed_tokens)
    ids = np.array([1, 40, 41, 42, 43, 44])
    full, _ = dec(table[ids][None], np.ones((1, 6), np.int64), dec.empty_past())
    _, past = dec(table[ids[:5]][None], np.ones((1, 5), np.int64), dec.empty_past())
    assert past["past_key_values.0.key"].shape == (1, 2, 5, 32)
    step, _ = dec(table[ids[5:]][None], np.ones((1, 6), np.int64), past)
    np.testing.assert_allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_embedding_table_and_sizes(src, shared_bundle, per_budget_bundle, dynamo_decoders):
    table = np.load(shared_bundle[0] / "llm/embed_tokens.npy")
    ref = src.model.language_model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table, ref)
    genai_fp32 = shared_bundle[1].llm.quantization["bytes"]
    genai_int8 = per_budget_bundle[1].llm.quantization["bytes"]
    dynamo_fp32 = dynamo_decoders["fp32"][1].quantization["bytes"]
    dynamo_int4 = dynamo_decoders["int4"][1].quantization["bytes"]
    assert genai_int8 < genai_fp32 / 2 and dynamo_int4 < dynamo_fp32 / 2


def test_unsupported_combinations_are_refused():
    with pytest.raises(ExportError, match="needs --target cuda"):
        check_combo("fp16", "cpu", "auto", "llama")
    with pytest.raises(ExportError, match="int4 or fp16"):
        check_combo("int8", "cuda", "auto", "llama")
    with pytest.raises(ExportError, match="--exporter dynamo"):
        check_combo("fp32", "cpu", "genai", "gpt_neox")
    assert check_combo("int4", "cpu", "auto", "gpt_neox") == "dynamo"
    assert check_combo("int4", "cuda", "auto", "qwen2") == "genai"


def test_llm_cli_needs_an_existing_bundle(tmp_path, capsys):
    from export.llm import main

    assert main(["--demo-tiny", "--out", str(tmp_path / "none")]) == 2
    assert "python -m export.onnx" in capsys.readouterr().out
    assert main(["--demo-tiny", "--out", str(tmp_path), "--block-size", "24"]) == 2
    assert "power of two" in capsys.readouterr().out
