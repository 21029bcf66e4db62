"""export.quant.WeightOnly on a two-MatMul graph: which MatMuls get which bits, and refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.common import ExportError
from export.quant import INT4, WeightOnly, head_matmul


def two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 96])], [w1, w2],
    )  # fmt: skip
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )


def bits(model: onnx.ModelProto) -> dict[str, int]:
    return {
        n.name.split("_Q")[0]: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_the_head_is_found_through_the_graph():
    assert head_matmul(two_matmuls()) == "/lm_head/MatMul"


def test_int4_keeps_the_head_in_8_bits_and_eight_bit_names_more():
    got = bits(INT4(two_matmuls(), 32, "cpu"))
    assert sorted(got.values()) == [4, 8] and got[next(k for k in got if "lm_head" in k)] == 8
    both = bits(WeightOnly(4, eight_bit=("head", "down_proj"))(two_matmuls(), 32, "cpu"))
    assert sorted(both.values()) == [8, 8]
    plain = bits(WeightOnly(4)(two_matmuls(), 32, "cpu"))
    assert sorted(plain.values()) == [4, 4]


def test_a_name_that_matches_nothing_is_refused():
    with pytest.raises(ExportError, match="no MatMul matches"):
        WeightOnly(4, eight_bit=("gate_proj",))(two_matmuls(), 32, "cpu")


def test_the_description_says_what_was_done():
    assert "asymmetric" in INT4.describe() and "int8 for the LM head" in INT4.describe()
    assert "symmetric blocks" in WeightOnly(8).describe() and "int8 for" not in WeightOnly(8).describe()
