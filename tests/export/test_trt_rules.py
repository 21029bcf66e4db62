"""export.trt_rules: graphs that break each TensorRT rule fail with the rule named; ours pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import trt_rules

F, U8, I64 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT64
PIXELS = {"x": {"min": (1, 3, 8, 8), "opt": (1, 3, 8, 8), "max": (4, 3, 8, 8)}}


def model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def x_in(dtype=F, shape=("batch", 3, 8, 8)):
    return helper.make_tensor_value_info("x", dtype, list(shape))


def y_out(dtype=F):
    return helper.make_tensor_value_info("y", dtype, None)


def rules(m, profiles=PIXELS):
    return sorted({v.rule for v in trt_rules.check_model(m, profiles)})


def test_a_clean_graph_passes():
    assert rules(model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x_in()], [y_out()])) == []


def test_supported_op():
    m = model([helper.make_node("Unique", ["x"], ["y"], name="u")], [x_in()], [y_out()])
    assert rules(m) == ["supported-op"]
    custom = model(
        [helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")], [x_in()], [y_out()]
    )
    (v,) = trt_rules.check_model(custom, PIXELS)
    assert v.rule == "supported-op" and "com.microsoft::Gelu" in str(v)


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2], dilations=[2, 2]),
        helper.make_node("MaxPool", ["x"], ["y", "idx"], name="p", kernel_shape=[2, 2]),
        helper.make_node("AveragePool", ["x"], ["y"], name="p", kernel_shape=[2]),
        helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="r"),
        helper.make_node("Resize", ["x", "", "scales"], ["y"], name="z", mode="cubic", antialias=1),
    ],
)
def test_attributes(node):
    inputs = [x_in()]
    if "axes" in node.input:
        inputs.append(helper.make_tensor_value_info("axes", I64, [1]))  # a runtime input: not constant
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "scales")] if node.op_type == "Resize" else []
    m = model([node], inputs, [y_out()], inits)
    assert "attributes" in rules(m, None)


def test_uint8_only_into_a_sole_cast():
    shape_too = model(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Cast", ["x"], ["y"], name="cast", to=F),
        ],
        [x_in(U8, ("b", "h", "w", 3))],
        [y_out(), helper.make_tensor_value_info("s", I64, [4])],
    )
    (v,) = [v for v in trt_rules.check_model(shape_too) if v.rule == "uint8-into-cast"]
    assert v.where == "x" and "Shape (shape)" in v.detail
    into_int = model(
        [helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.INT32)], [x_in(U8)], [y_out()]
    )
    assert rules(into_int, None) == ["uint8-into-cast"]
    ok = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=F)], [x_in(U8)], [y_out()])
    assert rules(ok, None) == []
    middle = model(
        [
            helper.make_node("Cast", ["x"], ["u"], name="c1", to=U8),
            helper.make_node("Cast", ["u"], ["y"], name="c2", to=F),
        ],
        [x_in()],
        [y_out()],
    )
    assert rules(middle, None) == ["uint8-into-cast"]


def test_int64_only_in_shape_arithmetic():
    data = model(
        [
            helper.make_node("ArgMax", ["x"], ["i"], name="argmax", axis=1),
            helper.make_node("Cast", ["i"], ["y"], name="c", to=F),
        ],
        [x_in()],
        [y_out()],
    )
    assert rules(data) == ["int64-shape-only"]
    cast = model([helper.make_node("Cast", ["x"], ["y"], name="c", to=I64)], [x_in()], [y_out(I64)])
    assert rules(cast) == ["int64-shape-only"]
    shape_math = model(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Gather", ["s", "zero"], ["b"], name="g", axis=0),
            helper.make_node("Range", ["zero", "b", "one"], ["r"], name="range"),
            helper.make_node("Cast", ["r"], ["rf"], name="c", to=F),
            helper.make_node("ReduceSum", ["rf"], ["t"], name="sum", keepdims=0),
            helper.make_node("Add", ["x", "t"], ["y"], name="add"),
        ],
        [x_in()],
        [y_out()],
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )
    assert rules(shape_math) == []


def test_profile_covers_the_dynamic_axes():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x_in()], [y_out()])
    assert rules(m, {}) == ["profile"]  # a dynamic batch and no profile
    wrong = {"x": {"min": (1, 3, 8, 8), "opt": (1, 3, 8, 8), "max": (4, 3, 16, 16)}}  # static 8 given 16
    assert rules(m, wrong) == ["profile"]
    backwards = {"x": {"min": (2, 3, 8, 8), "opt": (1, 3, 8, 8), "max": (4, 3, 8, 8)}}
    assert rules(m, backwards) == ["profile"]
    assert rules(m, PIXELS) == []


def test_our_bundles_pass_and_the_old_frame_graph_does_not(shared_bundle, frame_bundle, tmp_path):
    from tests.export.test_trt import old_frames_graph

    for root, m in (shared_bundle, frame_bundle):
        assert trt_rules.check_bundle(root, m) == []
    (v, *_) = trt_rules.check_file(old_frames_graph(tmp_path))
    assert v.rule == "uint8-into-cast"
    assert "uint8-into-cast" in trt_rules.explain([f"old.onnx {v}"])


def test_the_export_gate_refuses_a_graph_tensorrt_would(frame_bundle, tmp_path, monkeypatch):
    import shutil

    from export.common import ExportError
    from export.gates import vision_gate
    from runtime.bundle import file_entry, verify_bundle, write_manifest

    root = tmp_path / "b"
    shutil.copytree(frame_bundle[0], root)
    m = verify_bundle(root)
    g = onnx.load(str(root / "vision/preprocess.onnx"))
    g.graph.node.insert(0, helper.make_node("Shape", ["frames"], ["extra_shape"], name="preprocess/extra"))
    onnx.save(g, str(root / "vision/preprocess.onnx"))
    m.files = [f if f.path != "vision/preprocess.onnx" else file_entry(root, f.path, f.role) for f in m.files]
    write_manifest(root, m)
    with pytest.raises(
        ExportError, match=r"(?s)preprocess.onnx \[uint8-into-cast\] frames.*rule uint8-into-cast"
    ):
        vision_gate(root, None, [], [])
