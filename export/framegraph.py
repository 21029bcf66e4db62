"""Preprocessing inside the vision graph: uint8 frames at their own size in, pixels out.

    frames uint8 [B, H, W, 3] (RGB, any H, W up to the declared maximum)
      -> pad to a square with the mean colour, image centred        (LLaVA "pad", expand2square)
      -> resize to S x S: PIL's bicubic (a = -0.5, filter stretched by the scale when shrinking),
         horizontal pass, round to uint8, vertical pass, round to uint8 (as PIL's 8-bit path)
      -> /255, (x - mean) / std in float32 (fmvr.preprocess.normalize's values, bit for bit)
      -> pixel_values [B, 3, S, S] -> the tower, projector and pyramid

Why not ONNX Resize: torch.onnx (dynamo) turns F.interpolate(bicubic, antialias=True) into
Resize(cubic, antialias=1, cubic_coeff_a=-0.5, exclude_outside=1), which onnxruntime runs but
TensorRT's ONNX parser refuses ("Antialiasing is not supported"). So the resampling is written
out as PIL computes it: a weight matrix [S, side] from the frame's size (PIL's coefficients,
normalised per output pixel), sliced to the image's own columns and rows (the pad's share is
the mean colour), and two MatMuls. Every op is on TensorRT's list; the padded square is never
materialised. The weights are banded (an output pixel reads ~4 x side/S input pixels), so each
pass runs as BANDS MatMuls, one per block of outputs, over only the input pixels that block's
weights can touch (integer shape arithmetic, `_band`): the same sums without the exact zeros,
~4x fewer multiply-adds for a 640x480 frame at 384 px. fmvr.preprocess stays the reference (tests/export/test_framegraph.py measures
the difference: a few pixels in 10^4 off by one grey level).

The nodes are named "preprocess/..." (export.engine_inputs keeps those layers in fp32 under
TensorRT --fp16/--int8).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FRAME_INPUT = "frames"
PIXELS_OUTPUT = "pixel_values"
PREFIX = "preprocess/"
CUBIC_A = -0.5  # PIL's bicubic (ONNX Resize's default -0.75 is another filter)
# NORMALISE: fmvr.preprocess.normalize rescales in float64 (v * (1/255)) then rounds to float32;
# a float32 division v / 255 gives the same float32 for every grey level v in 0..255 (checked in
# tests/export/test_framegraph.py), and (x - mean) / std is then the same float32 arithmetic.
METHOD = (
    "pad to square with the mean colour (centred), PIL bicubic a=-0.5 antialiased "
    "(filter support 2 x max(1, side/S)), horizontal then vertical pass, round half up to uint8 after each, "
    "then (x/255 - mean)/std"
)


def parse_frame_size(text: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'1920x1080' (width x height, as cameras are named), '1920' (square) or (W, H) -> (W, H)."""
    if isinstance(text, (tuple, list)):
        parts = [str(v) for v in text] if len(text) == 2 else []
    else:
        parts = str(text).lower().split("x")
        parts = parts * 2 if len(parts) == 1 else parts if len(parts) == 2 else []
    try:
        w, h = (int(p) for p in parts) if parts else (0, 0)
    except ValueError:
        w, h = 0, 0
    if w < 1 or h < 1:
        raise ValueError(f"frame size {text!r}: use WIDTHxHEIGHT in pixels, e.g. 1920x1080, or one number")
    return w, h


class _Graph:
    """A few helpers around onnx.helper: named nodes, constants, values."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def _known(self, name: str) -> bool:
        return any(i.name == name for i in self.inits)

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        full = PREFIX + name
        if self._known(full):  # the same constant asked for again (e.g. by _columns): one initializer
            return full
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), full))
        return full

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.n += 1
        name = f"{PREFIX}{op_type.lower()}_{self.n}"  # every node under PREFIX (export.engines pins them)
        output = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output


def _weights(g: _Graph, side: str, size: int) -> str:
    """PIL's bicubic coefficients for side -> size, every output row normalised: float [S, side]."""
    f = np.float32
    scale = g.op("Div", g.op("Cast", side, to=1), g.const("size", f(size)))  # side / S
    stretch = g.op("Max", scale, g.const("one", f(1.0)))  # the filter widens by this when shrinking
    centre = g.op("Mul", g.const("out_centres", (np.arange(size, dtype=f) + 0.5)[:, None]), scale)  # [S, 1]
    j = g.op("Cast", g.op("Range", g.const("zero", 0, np.int64), side, g.const("step", 1, np.int64)), to=1)
    x = g.op("Div", g.op("Sub", g.op("Add", j, g.const("half", f(0.5))), centre), stretch)  # [S, side]
    ax = g.op("Abs", x)
    a = CUBIC_A
    near = g.op(  # |x| < 1: ((a + 2)|x| - (a + 3)) x^2 + 1
        "Add",
        g.op(
            "Mul",
            g.op("Sub", g.op("Mul", ax, g.const("a_plus_2", f(a + 2))), g.const("a_plus_3", f(a + 3))),
            g.op("Mul", ax, ax),
        ),
        g.const("one_k", f(1.0)),
    )
    poly = g.op("Add", g.op("Mul", g.op("Sub", ax, g.const("five", f(5.0))), ax), g.const("eight", f(8.0)))
    far = g.op("Mul", g.op("Sub", g.op("Mul", poly, ax), g.const("four", f(4.0))), g.const("a", f(a)))
    outside = g.op("Where", g.op("Less", ax, g.const("two", f(2.0))), far, g.const("zero_k", f(0.0)))
    w = g.op("Where", g.op("Less", ax, g.const("one_x", f(1.0))), near, outside)  # [S, side]
    total = g.op("ReduceSum", w, g.const("axis1", [1], np.int64), keepdims=1)  # [S, 1]
    return g.op("Div", w, total)  # [S, side]


def _columns(g: _Graph, w: str, start: str, count: str) -> str:
    """w[:, start : start + count]: the weights that fall on the image, not on the pad."""
    begin = g.op("Unsqueeze", start, g.const("axis0", [0], np.int64))
    end = g.op("Unsqueeze", g.op("Add", start, count), g.const("axis0", [0], np.int64))
    return g.op("Slice", w, begin, end, g.const("axes1", [1], np.int64))


BANDS = 8  # output blocks of each resize pass (module docstring: the banded MatMuls)


def _band(
    g: _Graph, side: str, size: int, first: int, last: int, offset: str, extent: str
) -> tuple[str, str]:
    """[start, end) of the frame pixels (along one axis, `extent` long, `offset` into the padded
    square) that outputs first..last of a side -> size resize read: every pixel whose bicubic weight
    can be non-zero, with a pixel of margin, clipped to the frame and never empty. Integer shape
    arithmetic only (TensorRT computes it as shape tensors): output i's centre is (i + 0.5) side / S,
    its support 2 max(side, S) / S pixels, so the band is
    ((2 first + 1) side - 4 M - S) / 2S - 1 .. ((2 last + 1) side + 4 M - S) / 2S + 2, M = max(side, S)."""
    i64 = np.int64
    side1 = g.op("Reshape", side, g.const("shape1", [1], i64))  # [1]
    m4 = g.op("Mul", g.op("Max", side1, g.const("size_i", [size], i64)), g.const("four_i", [4], i64))
    den = g.const("two_size", [2 * size], i64)
    lo = g.op("Sub", g.op("Sub", g.op("Mul", side1, g.const(f"a{first}", [2 * first + 1], i64)), m4),
              g.const("size_j", [size], i64))  # fmt: skip
    hi = g.op("Sub", g.op("Add", g.op("Mul", side1, g.const(f"a{last}", [2 * last + 1], i64)), m4),
              g.const("size_j", [size], i64))  # fmt: skip
    # ONNX integer Div truncates toward zero: -1 / +2 cover both roundings and the margin
    start = g.op("Sub", g.op("Sub", g.op("Div", lo, den), g.const("one_i", [1], i64)), offset)
    end = g.op("Sub", g.op("Add", g.op("Div", hi, den), g.const("two_i1", [2], i64)), offset)
    ext = g.op("Reshape", extent, g.const("shape1", [1], i64))
    zero = g.const("zero_i1", [0], i64)
    start = g.op("Min", g.op("Max", start, zero), g.op("Sub", ext, g.const("one_i", [1], i64)))
    end = g.op("Max", g.op("Min", end, ext), g.op("Add", start, g.const("one_i", [1], i64)))
    return start, end


def _slice(g: _Graph, x: str, axis: int, start: str, end: str) -> str:
    return g.op("Slice", x, start, end, g.const(f"axis_{axis}", [axis], np.int64))


def _banded_rows(g: _Graph, x: str, wx: str, side: str, size: int, left: str, w: str) -> str:
    """x [B, 3, H, W] @ wx [W, S] in BANDS blocks of output columns, each reading only the frame
    columns its weights can touch: the same sums (the skipped terms are exact zeros), ~BANDS/2 x
    fewer multiply-adds at camera sizes."""
    cuts = [round(k * size / BANDS) for k in range(BANDS + 1)]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        start, end = _band(g, side, size, a, b - 1, left, w)
        cols = g.op("Slice", wx, g.const(f"c{a}", [a], np.int64), g.const(f"c{b}", [b], np.int64),
                    g.const("axis_1", [1], np.int64))  # [W, b - a]  # fmt: skip
        parts.append(g.op("MatMul", _slice(g, x, 3, start, end), _slice(g, cols, 0, start, end)))
    return g.op("Concat", *parts, axis=3)  # [B, 3, H, S]


def _banded_square(g: _Graph, wy: str, rows: str, side: str, size: int, top: str, h: str) -> str:
    """wy [S, H] @ rows [B, 3, H, S] in BANDS blocks of output rows (as _banded_rows)."""
    cuts = [round(k * size / BANDS) for k in range(BANDS + 1)]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        start, end = _band(g, side, size, a, b - 1, top, h)
        block = g.op("Slice", wy, g.const(f"c{a}", [a], np.int64), g.const(f"c{b}", [b], np.int64),
                     g.const("axis_0", [0], np.int64))  # [b - a, H]  # fmt: skip
        parts.append(g.op("MatMul", _slice(g, block, 1, start, end), _slice(g, rows, 2, start, end)))
    return g.op("Concat", *parts, axis=2)  # [B, 3, S, S]


def _round_uint8(g: _Graph, x: str, bg: str) -> str:
    """bg + x, rounded half up and clipped to 0..255, as PIL stores each pass (float, integer-valued)."""
    up = g.op("Floor", g.op("Add", x, bg))  # bg here holds the pad colour + 0.5
    return g.op("Clip", up, g.const("lo", np.float32(0.0)), g.const("hi", np.float32(255.0)))


def preprocess_nodes(pre: Any, out_dtype: str) -> tuple[list[Any], list[Any], str]:
    """Nodes and initializers from FRAME_INPUT to the tower's input; returns (nodes, inits,
    name of the tensor the tower reads). PIXELS_OUTPUT is the float32 normalised image."""
    g = _Graph()
    size = int(pre.size)
    bg = np.asarray(pre.pad_color, dtype=np.float32).reshape(1, 3, 1, 1)  # [1, 3, 1, 1]
    # TensorRT takes a UINT8 network input only when a Cast to float is its sole consumer
    # (export/trt_rules.py, "uint8-into-cast"): the shape is read from the cast, never from the frames.
    frames = g.op("Cast", FRAME_INPUT, to=1)  # [B, H, W, 3] float32, grey levels 0..255
    shape = g.op("Shape", frames)
    h = g.op("Gather", shape, g.const("dim_h", 1, np.int64), axis=0)
    w = g.op("Gather", shape, g.const("dim_w", 2, np.int64), axis=0)
    side = g.op("Max", h, w)
    two = g.const("two_i", 2, np.int64)
    left, top = g.op("Div", g.op("Sub", side, w), two), g.op("Div", g.op("Sub", side, h), two)
    weights = _weights(g, side, size)  # [S, side]
    wx = g.op("Transpose", _columns(g, weights, left, w), perm=[1, 0])  # [W, S]
    wy = _columns(g, weights, top, h)  # [S, H]
    x = g.op("Transpose", frames, perm=[0, 3, 1, 2])  # [B, 3, H, W]
    x = g.op("Sub", x, g.const("pad", bg))  # the pad is zero from here on
    rows = _banded_rows(g, x, wx, side, size, left, w)  # [B, 3, H, S]
    rows = g.op("Sub", _round_uint8(g, rows, g.const("pad_half", bg + 0.5)), g.const("pad_again", bg))
    square = _round_uint8(g, _banded_square(g, wy, rows, side, size, top, h), g.const("pad_half_2", bg + 0.5))
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 3, 1, 1)  # [1, 3, 1, 1]
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, 3, 1, 1)
    scaled = g.op("Div", square, g.const("grey_levels", np.float32(255.0)))  # v / 255: see NORMALISE
    pixels = g.op("Div", g.op("Sub", scaled, g.const("mean", mean)), g.const("std", std), out=PIXELS_OUTPUT)
    tower_in = g.op("Cast", pixels, to=10) if out_dtype == "float16" else pixels
    return g.nodes, g.inits, tower_in


def add_frame_input(model: Any, pixel_input: str, pre: Any, max_frame: tuple[int, int]) -> Any:
    """Put preprocess_nodes in front of `model` (an onnx.ModelProto whose input is `pixel_input`
    [B, 3, S, S]): the new input is FRAME_INPUT uint8 [batch, height, width, 3]. max_frame (W, H)
    is the declared maximum, recorded in the graph's doc string."""
    from onnx import TensorProto, helper

    graph = model.graph
    (old,) = [i for i in graph.input if i.name == pixel_input]
    elem = old.type.tensor_type.elem_type
    dtype = "float16" if elem == TensorProto.FLOAT16 else "float32"
    nodes, inits, tower_in = preprocess_nodes(pre, dtype)
    for node in graph.node:  # the tower now reads the graph's pixels
        node.input[:] = [tower_in if n == pixel_input else n for n in node.input]
    tower = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + tower)  # protobuf lists: no slice assignment
    graph.initializer.extend(inits)
    others = [i for i in graph.input if i.name != pixel_input]
    del graph.input[:]
    frames = helper.make_tensor_value_info(FRAME_INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])
    graph.input.extend([frames, *others])
    graph.doc_string = f"frames uint8 [B, H, W, 3], W <= {max_frame[0]}, H <= {max_frame[1]}; {METHOD}"
    return model


def frame_only_model(pre: Any, opset: int) -> Any:
    """The preprocessing alone, the same nodes, as a model: frames -> pixel_values float32. The
    bundle ships it as vision/preprocess.onnx (the export's pixel check, `runtime latency`'s timing:
    onnxruntime runs a whole graph whatever outputs are asked for)."""
    from onnx import TensorProto, helper

    nodes, inits, _ = preprocess_nodes(pre, "float32")
    size = int(pre.size)
    graph = helper.make_graph(
        nodes,
        "frame_preprocess",
        [helper.make_tensor_value_info(FRAME_INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(PIXELS_OUTPUT, TensorProto.FLOAT, ["batch", 3, size, size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # what torch.onnx writes for the vision graphs; readable by older runtimes
    return model
