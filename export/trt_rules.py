"""The TensorRT 10 ONNX parser's rules that matter to our graphs, checked on any machine.

A graph TensorRT would refuse fails at export (export.gates.vision_gate) and before each engine
build (export.engines.build_one), with the rule named, instead of on the first Jetson that
parses it. The rules (RULES below) come from onnx-tensorrt's docs/operators.md (the op list and
its restrictions: export/data/trt_onnx_ops.json) and TensorRT's DataType documentation
(NvInferRuntimeBase.h: kUINT8 "Use the IdentityLayer [the parser's Cast] to convert kUINT8
network-level inputs to {kFLOAT, kHALF} prior to use with other TensorRT layers").

    check_model(model, profiles) -> [Violation]     an onnx.ModelProto
    check_file(path, profiles)   -> [Violation]
    check_bundle(root, m)        -> [str]           every vision graph of a bundle, default profile

torch-free; onnx is imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Shapes = Mapping[str, tuple[int, ...]]  # {"min", "opt", "max"} -> dims
RULES = {
    "supported-op": "every node's op is on TensorRT's ONNX operator list (custom domains are not)",
    "attributes": "restricted ops keep within the parser's restrictions (pooling 2D/3D without "
    "dilation or Indices, Reduce/Squeeze/Unsqueeze axes constant, Resize without antialias, "
    "TopK sorted, LayerNormalization's Y only)",
    "uint8-into-cast": "a UINT8 tensor is a network input whose sole consumer is a Cast to FLOAT/FLOAT16 "
    "(or a network output made by such a Cast); nothing else reads or writes UINT8",
    "int64-shape-only": "INT64 tensors only in shape arithmetic: from Shape, constants and other shape "
    "tensors, never from the data path (no Cast of image data to INT64, no ArgMax indices)",
    "profile": "every graph input has an optimization profile: its dynamic axes within 1 <= min <= opt "
    "<= max, its static axes equal to the profile's",
}
FLOAT, UINT8, INT64, FLOAT16 = 1, 2, 7, 10  # onnx.TensorProto element types
POOLS = ("MaxPool", "AveragePool")
CONSTANT_AXES = {  # op -> index of the input that must be a build-time constant
    "ReduceMean": 1,
    "ReduceSum": 1,
    "ReduceMax": 1,
    "ReduceMin": 1,
    "ReduceProd": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "CumSum": 1,
}
SHAPE_SOURCES = ("Shape", "Size")


@dataclass(frozen=True)
class Violation:
    rule: str  # a key of RULES
    where: str  # node or tensor name
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.detail}"


def supported_ops() -> set[str]:
    data = json.loads((Path(__file__).parent / "data" / "trt_onnx_ops.json").read_text())
    return set(data["supported"])


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dtypes(model: Any) -> dict[str, int]:
    """Tensor name -> element type, from shape inference, the graph's declarations and constants."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference is a help, not a requirement: declared types still count
        graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type")
    }
    types.update({i.name: i.data_type for i in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant" and _attr(n, "value") is not None:
            types[n.output[0]] = _attr(n, "value").data_type
        if n.op_type == "Cast":
            types[n.output[0]] = int(_attr(n, "to"))
    return types


def check_model(model: Any, profiles: Mapping[str, Shapes] | None = None) -> list[Violation]:
    """Every rule on `model`; `profiles`: {input name: {min, opt, max} dims} (None: the profile
    rule is not checked)."""
    graph = model.graph
    ok_ops = supported_ops()
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    inputs = [i for i in graph.input if i.name not in constants]
    outputs = {o.name for o in graph.output}
    types = _dtypes(model)
    consumers: dict[str, list[Any]] = {}
    producer: dict[str, Any] = {}
    for n in graph.node:
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(n)
        for y in n.output:
            producer[y] = n
    out: list[Violation] = []

    for n in graph.node:
        name = n.name or f"{n.op_type} -> {n.output[0] if n.output else '?'}"
        if n.domain not in ("", "ai.onnx") or n.op_type not in ok_ops:
            op = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            out.append(Violation("supported-op", name, f"{op} is not on TensorRT's ONNX operator list"))
            continue
        out += [Violation("attributes", name, why) for why in _attribute_problems(n, constants)]

    # uint8-into-cast: TensorRT converts UINT8 only at the network's edge, through a Cast.
    for x, t in types.items():
        if t != UINT8 or x in constants:
            continue
        users = consumers.get(x, [])
        if any(i.name == x for i in inputs):
            if (
                len(users) != 1
                or users[0].op_type != "Cast"
                or int(_attr(users[0], "to")) not in (FLOAT, FLOAT16)
            ):
                ops = ", ".join(f"{u.op_type} ({u.name})" for u in users) or "nothing"
                out.append(
                    Violation(
                        "uint8-into-cast",
                        x,
                        f"UINT8 input read by {ops}: a Cast to float must be its sole consumer",
                    )
                )
        elif x in outputs and producer.get(x) is not None and producer[x].op_type == "Cast":
            src = types.get(producer[x].input[0])
            if src not in (FLOAT, FLOAT16):
                out.append(Violation("uint8-into-cast", x, "UINT8 output cast from a non-float tensor"))
        else:
            out.append(Violation("uint8-into-cast", x, "an intermediate UINT8 tensor"))

    # int64-shape-only: walk the graph in order, marking what derives from shapes and constants.
    shape_class = set(constants)
    for n in graph.node:  # ONNX nodes are topologically sorted
        ins = [x for x in n.input if x]
        derived = n.op_type in SHAPE_SOURCES or (ins and all(x in shape_class for x in ins))
        if derived:
            shape_class.update(n.output)
            continue
        for y in n.output:
            if types.get(y) == INT64:
                why = f"{n.op_type} makes INT64 from the data path ({', '.join(x for x in ins if x not in shape_class)})"
                out.append(Violation("int64-shape-only", n.name or y, why))
    for i in inputs:
        if types.get(i.name) == INT64:
            out.append(Violation("int64-shape-only", i.name, "an INT64 network input"))

    if profiles is not None:
        for i in inputs:
            out += [Violation("profile", i.name, why) for why in _profile_problems(i, profiles.get(i.name))]
    return out


def _attribute_problems(n: Any, constants: set[str]) -> list[str]:
    why = []
    if n.op_type in POOLS:
        kernel = _attr(n, "kernel_shape", [])
        if len(kernel) not in (2, 3):
            why.append(f"{len(kernel)}D pooling (TensorRT pools 2D or 3D)")
        if any(d != 1 for d in _attr(n, "dilations", [])):
            why.append("pooling with dilations")
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            why.append("MaxPool's Indices output")
    if n.op_type in CONSTANT_AXES:
        k = CONSTANT_AXES[n.op_type]
        if len(n.input) > k and n.input[k] and n.input[k] not in constants:
            why.append(f"its axes input {n.input[k]!r} is not a build-time constant")
    if n.op_type == "Resize" and int(_attr(n, "antialias", 0)):
        why.append("Resize with antialias=1 (TensorRT: 'Antialiasing is not supported')")
    if n.op_type == "TopK" and int(_attr(n, "sorted", 1)) != 1:
        why.append("TopK with sorted=0")
    if n.op_type == "LayerNormalization" and any(n.output[1:]):
        why.append("LayerNormalization's Mean/InvStdDev outputs")
    return why


def _profile_problems(value: Any, shapes: Shapes | None) -> list[str]:
    dims = value.type.tensor_type.shape.dim
    dynamic = [j for j, d in enumerate(dims) if not d.HasField("dim_value")]
    if shapes is None:
        return [f"dynamic axes {dynamic} without an optimization profile"] if dynamic else []
    lo, opt, hi = shapes["min"], shapes["opt"], shapes["max"]
    if not len(lo) == len(opt) == len(hi) == len(dims):
        return [f"rank {len(dims)}, the profile's {len(lo)}"]
    why = []
    for j, d in enumerate(dims):
        if d.HasField("dim_value"):
            if not lo[j] == opt[j] == hi[j] == d.dim_value:
                why.append(f"static axis {j} is {d.dim_value}, the profile gives {lo[j]}/{opt[j]}/{hi[j]}")
        elif not 1 <= lo[j] <= opt[j] <= hi[j]:
            why.append(
                f"dynamic axis {j} ({d.dim_param or '?'}): profile {lo[j]}/{opt[j]}/{hi[j]} is not 1 <= min <= opt <= max"
            )
    return why


def check_file(path: str | Path, profiles: Mapping[str, Shapes] | None = None) -> list[Violation]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError:  # not a graph at all: the runtime loader, which the gate runs next, names it
        return []
    return check_model(model, profiles)


def default_profiles(m: Any, max_batch: int = 4) -> dict[str, Shapes]:
    """The profile `python -m export.trt` builds with by default (batch 1..max_batch; frames 1x1 to
    the bundle's --max-frame), for the bundle's vision input."""
    from export.engine_inputs import frame_profile

    s = m.vision.image_size
    batch = {"min": (1, 3, s, s), "opt": (1, 3, s, s), "max": (max_batch, 3, s, s)}
    spec = m.vision.preprocess
    return {m.vision.input_name: batch if spec is None else frame_profile(batch, None, spec)}


def check_bundle(root: str | Path, m: Any) -> list[str]:
    """Every vision graph of the bundle (what TensorRT or onnxruntime's TensorRT provider parses):
    one line per violation, prefixed with the file."""
    files = [f.path for f in m.files if f.role in ("vision-onnx", "vision-preprocess")]
    spec = m.vision.preprocess
    if spec is not None and spec.graph and spec.graph not in files:
        files.append(spec.graph)
    profiles = default_profiles(m)
    return [f"{rel} {v}" for rel in files for v in check_file(Path(root) / rel, profiles)]


def explain(lines: list[str]) -> str:
    rules = sorted({line.split("[", 1)[1].split("]", 1)[0] for line in lines if "[" in line})
    return "\n  ".join([*lines[:20], *(f"rule {r}: {RULES[r]}" for r in rules if r in RULES)])
