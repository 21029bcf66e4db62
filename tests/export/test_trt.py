"""TensorRT code without TensorRT: pure logic, a fake `tensorrt` module, the op list, mypy.

The real engine build is a `gpu` test (skipped here with the reason).
"""

from __future__ import annotations

import enum
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

import export.engines as et
from export.common import ExportError

# ---- pure logic -------------------------------------------------------------------------------------


def opts(**kw):
    return et.BuildOptions(precision=kw.pop("precision", "fp16"), **kw)


def test_profile_shapes_and_flags():
    shapes = et.profile_shapes(opts(min_batch=1, opt_batch=2, max_batch=8), 336)
    assert shapes == {"min": (1, 3, 336, 336), "opt": (2, 3, 336, 336), "max": (8, 3, 336, 336)}
    for bad in ({"min_batch": 0}, {"opt_batch": 5, "max_batch": 4}, {"min_batch": 3, "opt_batch": 2}):
        with pytest.raises(ExportError, match="--min-batch <= --opt-batch <= --max-batch"):
            et.profile_shapes(opts(**bad), 336)
    assert [et.precision_of(False, False), et.precision_of(True, False), et.precision_of(True, True)] == [
        "fp32",
        "fp16",
        "int8",
    ]
    assert et.builder_flags("fp32") == [] and et.builder_flags("int8") == ["INT8", "FP16"]
    assert et.engine_paths(36, "fp16") == ("vision/t36.fp16.engine", "vision/t36.fp16.engine.json")


def test_calibration_files_and_batches(tmp_path):
    with pytest.raises(ExportError, match="--calib-images DIR"):
        et.calibration_files(None)
    with pytest.raises(ExportError, match="not a directory"):
        et.calibration_files(str(tmp_path / "nope"))
    with pytest.raises(ExportError, match="no images"):
        et.calibration_files(str(tmp_path))
    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("skip me")
    files = et.calibration_files(str(tmp_path))
    assert len(files) == 10
    seen = []

    def pre(paths):
        seen.append([p.name for p in paths])
        return np.zeros((len(paths), 3, 8, 8), np.float64)

    batches = list(et.calibration_batches(files, 4, pre))
    assert [b.shape for b in batches] == [(4, 3, 8, 8)] * 2 and batches[0].dtype == np.float32
    assert seen[1] == ["04.jpg", "05.jpg", "06.jpg", "07.jpg"]  # in order; the last 2 dropped
    with pytest.raises(ExportError, match="at least 16 images"):
        list(et.calibration_batches(files, 16, pre))


def test_parser_errors_and_build_failure_mapping():
    class Err:
        def __init__(self, i):
            self.i = i

        def node(self):
            return self.i

        def node_name(self):
            return f"/pyramid/n{self.i}"

        def node_operator(self):
            return "MaxPool"

        def desc(self):
            return "dilations unsupported"

    parser = types.SimpleNamespace(num_errors=2, get_error=Err)
    assert et.parser_errors(parser) == [
        "node #0 '/pyramid/n0' (MaxPool): dilations unsupported",
        "node #1 '/pyramid/n1' (MaxPool): dilations unsupported",
    ]
    oom = et.build_failure(["Requested amount of GPU memory could not be allocated: out of memory"], opts())
    assert "--max-batch (now 4)" in str(oom) and "--workspace-gb (now 2.0)" in str(oom)
    other = et.build_failure(["Myelin failed"], opts())
    assert "failed to build" in str(other) and "Myelin failed" in str(other)


def test_sidecar_fields():
    s = et.sidecar(opts(opt_batch=2), "10.3.0", ("Orin", "8.7"), "e" * 64, "vision/all.onnx", "o" * 64)
    assert s["trt_version"] == "10.3.0" and s["gpu_name"] == "Orin" and s["compute_capability"] == "8.7"
    assert s["precision"] == "fp16" and s["profile"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 4}
    assert s["engine_sha256"] == "e" * 64 and s["onnx_sha256"] == "o" * 64
    json.dumps(s)


def test_require_tensorrt_errors():
    def missing(name):
        raise ImportError("No module named 'tensorrt'")

    with pytest.raises(ExportError, match="JetPack.*pypi.nvidia.com"):
        et.require_tensorrt(missing)
    stubs_only = types.ModuleType("tensorrt")
    stubs_only.__path__ = ["/site-packages/tensorrt"]
    with pytest.raises(ExportError, match="holds only type stubs"):
        et.require_tensorrt(lambda name: stubs_only)
    old = types.SimpleNamespace(Builder=object, __version__="8.6.1")
    with pytest.raises(ExportError, match="TensorRT 8.6.1 found.*10"):
        et.require_tensorrt(lambda name: old)


def test_cli_fails_helpfully_without_tensorrt(capsys):
    if hasattr(et.importlib.import_module("tensorrt") if _importable() else None, "Builder"):
        pytest.skip("TensorRT is installed here: the gpu tests cover the real path")
    from export.cli import trt_main

    assert trt_main(["--tokens", "36", "--bundle", "nowhere"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().out


def _importable() -> bool:
    try:
        et.importlib.import_module("tensorrt")
    except ImportError:
        return False
    return True


# ---- a fake tensorrt module drives build_engine ------------------------------------------------------


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3


def fake_trt(parse_ok=True, build=b"ENGINE", log=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    calls = trt.calls = {"flags": [], "cleared": [], "profile": None, "pool": None, "calib": None}

    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

    class Config:
        int8_calibrator = None

        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def clear_flag(self, flag):
            calls["cleared"].append(flag)

        def add_optimization_profile(self, p):
            calls["profile"] = p.shapes

        def set_calibration_profile(self, p):
            calls["calib"] = p

        def create_timing_cache(self, data):
            calls["cache_in"] = data
            return types.SimpleNamespace(serialize=lambda: b"CACHE+" + data)

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return FakeNetwork()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            for msg in log or []:
                self.logger.log(Severity.ERROR, msg)
            return build

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            self.broken = uint8_rule(path)  # TensorRT's UINT8 rule, modelled (NvInferRuntimeBase.h)
            return parse_ok and not self.broken

        def get_error(self, i):
            if getattr(self, "broken", None):
                name, op = self.broken[i]
                return types.SimpleNamespace(
                    node=lambda: i,
                    node_name=lambda: name,
                    node_operator=lambda: op,
                    desc=lambda: "UINT8 network input must be consumed only by a Cast to float",
                )
            return types.SimpleNamespace(
                node=lambda: 7,
                node_name=lambda: "/x",
                node_operator=lambda: "Foo",
                desc=lambda: "no importer",
            )

        @property
        def num_errors(self):
            return len(getattr(self, "broken", None) or []) or (0 if parse_ok else 1)

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, Parser
    trt.float32, trt.int64 = "FLOAT", "INT64"
    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(
        FP16="FP16", INT8="INT8", TF32="TF32", PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS"
    )
    trt.Dims = tuple
    return trt


def uint8_rule(path) -> list[tuple[str, str]]:
    """TensorRT takes a UINT8 network input only when a Cast to float is its sole consumer:
    the (node name, op) of every other consumer, or of a second one (a missing file: nothing)."""
    if not Path(path).is_file():
        return []
    g = onnx.load(str(path), load_external_data=False).graph
    bad = []
    for i in g.input:
        if i.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        users = [n for n in g.node if i.name in n.input]
        if len(users) != 1 or users[0].op_type != "Cast":
            bad += [(n.name, n.op_type) for n in users if n.op_type != "Cast"] or [(i.name, "Cast")]
    return bad


class FakeLayer:
    def __init__(self, name, dtypes):
        self.name, self.precision, self.out_types = name, None, {}
        self.outputs = [types.SimpleNamespace(dtype=d) for d in dtypes]
        self.num_outputs = len(dtypes)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.out_types[j] = dtype


class FakeNetwork:
    """What the ONNX parser makes of a frame-input graph, in miniature (layer names = node names)."""

    def __init__(self):
        self.layers = [
            FakeLayer("preprocess/shape_1", ["INT64"]),
            FakeLayer("preprocess/matmul_40", ["FLOAT"]),
            FakeLayer("preprocess/normalize_table", ["FLOAT"]),
            FakeLayer("/model/vision_tower/conv", ["FLOAT"]),
        ]
        self.num_layers = len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


def frame_spec(width=1920, height=1920):
    from runtime.bundle import GraphPreprocess

    return GraphPreprocess(input_name="frames", max_height=height, max_width=width, method="test")


def test_frame_input_profile_spans_1x1_to_the_declared_maximum():
    spec = frame_spec(1920, 1080)
    shapes = et.input_profile(opts(max_batch=2), 336, spec)
    assert shapes == {"min": (1, 1, 1, 3), "opt": (1, 720, 1280, 3), "max": (2, 1080, 1920, 3)}
    small = et.input_profile(opts(), 336, frame_spec(640, 480))  # the default opt frame, cut to fit
    assert small["opt"] == (1, 480, 640, 3) and small["max"] == (4, 480, 640, 3)
    assert et.input_profile(opts(opt_frame=(320, 240)), 336, spec)["opt"] == (1, 240, 320, 3)
    assert et.input_profile(opts(), 336, None) == et.profile_shapes(opts(), 336)  # pixels: as before
    with pytest.raises(
        ExportError, match=r"--opt-frame 2000x100 lies outside .*1x1 to 1920x1080.*--max-frame"
    ):
        et.input_profile(opts(opt_frame=(2000, 100)), 336, spec)
    with pytest.raises(ExportError, match="--min-batch <= --opt-batch"):
        et.input_profile(opts(min_batch=3, opt_batch=2), 336, spec)
    rec = et.profile_record(shapes, frames=True)
    assert rec == {
        "min_batch": 1,
        "opt_batch": 1,
        "max_batch": 2,
        "min_height": 1,
        "min_width": 1,
        "opt_height": 720,
        "opt_width": 1280,
        "max_height": 1080,
        "max_width": 1920,
    }
    assert et.profile_record(et.profile_shapes(opts(), 336), frames=False) == {
        "min_batch": 1,
        "opt_batch": 1,
        "max_batch": 4,
    }


def test_build_engine_for_frames_with_fake_tensorrt(monkeypatch, tmp_path):
    """The profile is over (B, H, W, 3); under fp16 the preprocessing layers with float outputs are
    asked to stay fp32 (PREFER_PRECISION_CONSTRAINTS), the tower's and the integer ones are not."""
    trt = fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    networks = []
    real = trt.Builder.create_network
    monkeypatch.setattr(
        trt.Builder, "create_network", lambda self, f: networks.append(real(self, f)) or networks[-1]
    )
    spec = frame_spec(1280, 720)
    assert (
        et.build_engine(tmp_path / "g.onnx", "frames", opts(opt_frame=(640, 360)), 336, None, spec)
        == b"ENGINE"
    )
    assert trt.calls["profile"] == ("frames", (1, 1, 1, 3), (1, 360, 640, 3), (4, 720, 1280, 3))
    assert "PREFER_PRECISION_CONSTRAINTS" in trt.calls["flags"]
    layers = {layer.name: layer for layer in networks[-1].layers}
    assert layers["preprocess/matmul_40"].precision == "FLOAT" and layers[
        "preprocess/matmul_40"
    ].out_types == {0: "FLOAT"}
    assert layers["preprocess/normalize_table"].precision == "FLOAT"
    assert layers["preprocess/shape_1"].precision is None  # integer shape arithmetic: left alone
    assert layers["/model/vision_tower/conv"].precision is None  # the tower follows --fp16
    et.build_engine(tmp_path / "g.onnx", "frames", opts(precision="fp32"), 336, None, spec)
    assert all(layer.precision is None for layer in networks[-1].layers)  # fp32: nothing to keep


def test_int8_calibration_of_a_frame_graph_with_fake_tensorrt(
    monkeypatch, tmp_path, frame_bundle, real_images
):
    """INT8 on frames: calibration batches are the host's pad + resize as uint8 [B, S, S, 3], at a
    calibration profile of that one shape."""
    trt = fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    for i, im in enumerate(real_images * 2):
        im.save(tmp_path / f"{i}.jpg")
    m = frame_bundle[1]
    files = et.calibration_files(str(tmp_path))
    (batch,) = list(et.calibration_batches(files, 4, et.calibration_input(m), np.uint8))
    assert batch.shape == (4, 336, 336, 3) and batch.dtype == np.uint8
    calib = et.make_calibrator(iter(()), 4, tmp_path / "c.calib")
    et.build_engine(
        tmp_path / "g.onnx", "frames", opts(precision="int8", calib_batch=4), 336, calib, frame_spec()
    )
    assert trt.calls["calib"].shapes == ("frames", (4, 336, 336, 3), (4, 336, 336, 3), (4, 336, 336, 3))
    assert trt.calls["flags"][:2] == ["INT8", "FP16"]


def test_build_engine_with_fake_tensorrt(monkeypatch, tmp_path):
    trt = fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    o = opts(precision="fp32", max_batch=2, workspace_gb=0.5, timing_cache=str(cache))
    assert et.build_engine(tmp_path / "g.onnx", "pixel_values", o, 336, None) == b"ENGINE"
    assert trt.calls["pool"] == ("WORKSPACE", 1 << 29) and trt.calls["flags"] == []
    assert trt.calls["cleared"] == ["TF32"]  # fp32 means fp32, not TF32
    assert trt.calls["profile"] == ("pixel_values", (1, 3, 336, 336), (1, 3, 336, 336), (2, 3, 336, 336))
    assert trt.calls["cache_in"] == b"old" and cache.read_bytes() == b"CACHE+old"


def test_build_engine_failures_with_fake_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(parse_ok=False))
    with pytest.raises(ExportError, match=r"could not parse g.onnx:\n  node #7 '/x' \(Foo\): no importer"):
        et.build_engine(tmp_path / "g.onnx", "pixel_values", opts(), 336, None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(build=None, log=["cudaErrorMemoryAllocation"]))
    with pytest.raises(ExportError, match="out of GPU memory.*--max-batch"):
        et.build_engine(tmp_path / "g.onnx", "pixel_values", opts(), 336, None)


def test_int8_flags_and_calibrator_with_fake_tensorrt(monkeypatch, tmp_path):
    trt = fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    calib = et.make_calibrator(iter(()), 4, tmp_path / "t36.int8.calib")
    assert calib.get_batch_size() == 4 and calib.get_batch(["pixel_values"]) == []  # exhausted: done
    assert calib.read_calibration_cache() is None
    calib.write_calibration_cache(memoryview(b"scales"))
    assert calib.read_calibration_cache() == b"scales"
    et.build_engine(tmp_path / "g.onnx", "pixel_values", opts(precision="int8"), 336, calib)
    assert trt.calls["flags"] == ["INT8", "FP16"] and trt.calls["calib"] is not None


# ---- our graphs against TensorRT's operator list ------------------------------------------------------


def test_op_list_data_is_sourced():
    data = et.supported_ops()
    assert "onnx-tensorrt" in data["source"] and data["trt_version"].startswith("10")
    assert not set(data["supported"]) & set(data["unsupported"])


def test_every_op_of_our_vision_graphs_is_supported_by_tensorrt(shared_bundle, per_budget_bundle, tmp_path):
    root, m = shared_bundle
    graphs = [root / "vision/all.onnx", *(per_budget_bundle[0] / f"vision/t{t}.onnx" for t in (36, 1))]
    graphs.append(et.single_budget_graph(root, m, 9, tmp_path)[0])
    for path in graphs:
        assert et.unsupported_ops(path) == [], path.name
        g = onnx.load(str(path)).graph
        constants = {i.name for i in g.initializer} | {
            o for n in g.node if n.op_type == "Constant" for o in n.output
        }
        for n in g.node:  # TensorRT: ReduceMean/ReduceSum axes must be build-time constants
            if n.op_type in ("ReduceMean", "ReduceSum") and len(n.input) > 1:
                assert n.input[1] in constants, n.name
            if n.op_type in ("MaxPool", "AveragePool"):
                attrs = {a.name: list(a.ints) for a in n.attribute}
                assert len(attrs["kernel_shape"]) == 2 and set(attrs.get("dilations", [1])) == {1}


def test_unsupported_ops_flags_custom_domains(shared_bundle):
    assert any(
        op.startswith("com.microsoft::") for op in et.unsupported_ops(shared_bundle[0] / "llm/decoder.onnx")
    )


def test_single_budget_graph_from_shared_layout(shared_bundle, pixels, tmp_path):
    import onnxruntime as ort

    root, m = shared_bundle
    path, rel = et.single_budget_graph(root, m, 36, tmp_path)
    assert rel == "vision/all.onnx"
    one = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in one.get_outputs()] == ["tokens_36"]
    alone = one.run(None, {"pixel_values": pixels})[0]
    full = ort.InferenceSession(str(root / "vision/all.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(alone, full.run(["tokens_36"], {"pixel_values": pixels})[0])


# ---- types -----------------------------------------------------------------------------------------------


def test_trt_code_typechecks_against_tensorrt_stubs():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "export.typecheck"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success: no issues found in 4 source files" in res.stdout


# ---- the real thing ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_matches_onnxruntime(shared_bundle, tmp_path):
    """Needs TensorRT 10 and a CUDA GPU: fp16 engine for 36 tokens, sidecar, manifest, parity."""
    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    bundle = tmp_path / "b"
    shutil.copytree(shared_bundle[0], bundle)
    assert trt_main(["--bundle", str(bundle), "--tokens", "36", "--fp16", "--max-batch", "2"]) == 0
    m = verify_bundle(bundle)
    entry = m.vision.engines["36"]
    side = json.loads((bundle / entry.sidecar).read_text())
    assert side["parity"]["cosine"] >= 0.999 and side["latency_ms"]["median"] > 0
    assert (bundle / entry.file).read_bytes()[:4] != b"{"  # plain engine bytes, no JSON header


@pytest.fixture
def fake_build(monkeypatch):
    """TensorRT and the GPU faked; the engine gate (runtime.vision.TrtVision, needs a GPU) replaced
    by a settable record. Returns that record."""
    import export.gates as eg

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt())
    monkeypatch.setattr(et, "require_gpu", lambda: ("Fake Orin", "8.7"))
    parity = {"parity": {"cosine": 1.0, "max_abs": 1e-6}, "latency_ms": {"median": 1.0}}
    seen = parity["gated"] = []

    def gate(bundle, m, tokens, max_batch, opt_batch):
        entry = m.vision.engines[str(tokens)]
        seen.append((entry.file, (bundle / entry.file).read_bytes()))  # the candidate, as the runtime sees it
        return {k: v for k, v in parity.items() if k != "gated"}

    monkeypatch.setattr(eg, "engine_gate", gate)
    return parity


def test_cli_builds_engines_into_the_bundle_with_fake_tensorrt(fake_build, bundle_copy, tmp_path, capsys):
    """The whole command with TensorRT and the GPU faked: engine + sidecar written, listed, verified."""
    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    cache = tmp_path / "timing.cache"
    args = ["--bundle", str(bundle_copy), "--tokens", "36,9", "--fp16", "--max-batch", "2"]
    assert trt_main([*args, "--timing-cache", str(cache)]) == 0, capsys.readouterr().out
    m = verify_bundle(bundle_copy)
    assert sorted(m.vision.engines) == ["36", "9"]
    assert cache.read_bytes() == b"CACHE+CACHE+"  # the second build started from the first one's cache
    e = m.vision.engines["9"]
    assert (e.file, e.precision, e.compute_capability, e.trt_version) == (
        "vision/t9.fp16.engine",
        "fp16",
        "8.7",
        "10.13.0",
    )
    assert (bundle_copy / e.file).read_bytes() == b"ENGINE"  # plain engine bytes, nothing prepended
    gated_file, gated_bytes = fake_build["gated"][-1]
    assert gated_file.startswith(".trt-") and gated_bytes == b"ENGINE"  # gated before it was moved in
    side = json.loads((bundle_copy / e.sidecar).read_text())
    assert side["onnx"] == "vision/all.onnx" and side["onnx_sha256"] == m.file("vision/all.onnx").sha256
    assert side["profile"] == {"min_batch": 1, "opt_batch": 1, "max_batch": 2}
    assert side["parity"]["cosine"] > 0.999
    assert m.file(e.file).role == "vision-engine" and m.file(e.sidecar).role == "engine-sidecar"
    # an engine past tolerance: non-zero exit, and the manifest does not list it
    fake_build["parity"]["cosine"] = 0.9
    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "1", "--fp16"]) == 2
    assert "differs from onnxruntime" in capsys.readouterr().out
    assert "1" not in verify_bundle(bundle_copy).vision.engines
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".trt-")]


def test_cli_builds_a_frame_engine_with_fake_tensorrt(fake_build, frame_bundle, tmp_path, capsys):
    """A frame-input bundle: the shared graph pruned from `frames` to one budget, the profile over
    the frame size recorded in the sidecar and the manifest."""
    import onnx as onnx_lib

    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    bundle = tmp_path / "b"
    shutil.copytree(frame_bundle[0], bundle)
    args = ["--bundle", str(bundle), "--tokens", "36", "--fp16", "--opt-frame", "640x360", "--max-batch", "2"]
    assert trt_main(args) == 0, capsys.readouterr().out
    e = verify_bundle(bundle).vision.engines["36"]
    side = json.loads((bundle / e.sidecar).read_text())
    assert (
        side["profile"]
        == e.profile
        == {
            "min_batch": 1,
            "opt_batch": 1,
            "max_batch": 2,
            "min_height": 1,
            "min_width": 1,
            "opt_height": 360,
            "opt_width": 640,
            "max_height": 1920,
            "max_width": 1920,
        }
    )
    one, _ = et.single_budget_graph(bundle, verify_bundle(bundle), 36, tmp_path)
    g = onnx_lib.load(str(one)).graph
    assert [i.name for i in g.input] == ["frames"] and [o.name for o in g.output] == ["tokens_36"]
    assert et.unsupported_ops(one) == []
    assert trt_main(["--bundle", str(bundle), "--tokens", "9", "--opt-frame", "4000x10"]) == 2
    assert "--opt-frame 4000x10 lies outside" in capsys.readouterr().out
    assert trt_main(["--bundle", str(bundle), "--tokens", "9", "--opt-frame", "wide"]) == 2
    assert "--opt-frame: frame size 'wide'" in capsys.readouterr().out


def test_engine_gate_feeds_frames_at_their_own_size(frame_bundle, monkeypatch):
    """engine_gate on a frame-input bundle, TensorRT stood in for by the onnxruntime backend: each
    parity image goes in as its own frame (odd crops included); latency at the opt batch."""
    import export.gates as eg
    import runtime.vision as rv

    seen = []

    class StandIn(rv.OrtVision):
        def __init__(self, bundle, m, budgets=None):
            super().__init__(bundle, m, "ort-cpu")

        def encode(self, x, budgets):
            seen.append(x.shape)
            return super().encode(x, budgets)

    monkeypatch.setattr(rv, "TrtVision", StandIn)
    monkeypatch.setattr(eg, "LATENCY_RUNS", 2)
    root, m = frame_bundle
    rec = eg.engine_gate(root, m, 36, max_batch=2, opt_batch=2)
    assert rec["parity"]["cosine"] > 0.999999 and len(rec["parity"]["images"]) == 6
    assert (1, 360, 640, 3) in seen and (1, 500, 200, 3) in seen and (2, 427, 640, 3) in seen
    assert rec["latency_ms"]["input"] == [2, 427, 640, 3]


def engines_listed(m, tokens):
    return [
        f.path for f in m.files if f.role in ("vision-engine", "engine-sidecar") and f"/t{tokens}." in f.path
    ]


def test_rebuilding_a_budget_at_another_precision_lists_one_engine(fake_build, bundle_copy, capsys):
    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "36"]) == 0, capsys.readouterr().out
    assert engines_listed(verify_bundle(bundle_copy), 36) == [
        "vision/t36.fp32.engine",
        "vision/t36.fp32.engine.json",
    ]
    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "36", "--fp16"]) == 0, capsys.readouterr().out
    m = verify_bundle(bundle_copy)
    assert engines_listed(m, 36) == ["vision/t36.fp16.engine", "vision/t36.fp16.engine.json"]
    assert m.vision.engines["36"].precision == "fp16"
    assert [f.path for f in m.files if f.role == "vision-engine"] == ["vision/t36.fp16.engine"]
    assert not (bundle_copy / "vision/t36.fp32.engine").exists()  # the replaced engine's files are gone
    assert not (bundle_copy / "vision/t36.fp32.engine.json").exists()


def test_a_failed_rebuild_leaves_the_old_engine(fake_build, bundle_copy, monkeypatch, capsys):
    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "36", "--fp16"]) == 0, capsys.readouterr().out
    before = verify_bundle(bundle_copy)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(build=b"WORSE ENGINE"))
    fake_build["parity"]["cosine"] = 0.5
    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "36", "--fp16"]) == 2
    assert "the bundle is unchanged" in capsys.readouterr().out
    after = verify_bundle(bundle_copy)  # same files, same hashes
    assert after.vision.engines == before.vision.engines
    assert (bundle_copy / "vision/t36.fp16.engine").read_bytes() == b"ENGINE"


# ---- issue #27: the UINT8 rule, torch-free builds, version ranges, partial engine sets ------------------


def old_frames_graph(tmp_path):
    """The frame graph as it was: `frames` read by a Shape and a Cast (TensorRT refuses it)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["frames"], ["s"], name="preprocess/shape_1"),
        helper.make_node("Cast", ["frames"], ["f"], name="preprocess/cast_2", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["s"], ["sf"], name="preprocess/cast_3", to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["sf"], ["m"], name="preprocess/reducemax_4", keepdims=0),
        helper.make_node("Div", ["f", "m"], ["pixel_values"], name="preprocess/div_5"),
    ]
    g = helper.make_graph(
        nodes,
        "old",
        [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_the_fake_parser_models_the_uint8_rule_and_todays_frame_graph_obeys_it(monkeypatch, tmp_path):
    from export.framegraph import frame_only_model
    from fmvr.config import preset
    from fmvr.preprocess import Preprocessor

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt())
    with pytest.raises(
        ExportError, match=r"could not parse old.onnx:\n  node #0 'preprocess/shape_1' \(Shape\)"
    ):
        et.build_engine(old_frames_graph(tmp_path), "frames", opts(), 336, None, frame_spec())
    pre = Preprocessor(preset("tiny").vision.image_size)
    today = tmp_path / "preprocess.onnx"
    onnx.save(frame_only_model(pre, 18), str(today))
    assert uint8_rule(today) == []
    assert et.build_engine(today, "frames", opts(), 336, None, frame_spec()) == b"ENGINE"


class FakeCudart:
    """cuda-python's runtime API on host memory: every pointer is a real address (numpy buffers)."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices=1):
        self.bufs, self.devices = {}, devices
        self.calls = {"malloc": 0, "malloc_host": 0, "stream": 0}

    def _alloc(self, n, kind):
        a = np.zeros(max(n, 1), np.uint8)
        self.bufs[a.ctypes.data] = a
        self.calls[kind] += 1
        return 0, a.ctypes.data

    def cudaMalloc(self, n):  # noqa: N802
        return self._alloc(n, "malloc")

    def cudaMallocHost(self, n):  # noqa: N802
        return self._alloc(n, "malloc_host")

    def cudaFree(self, p):  # noqa: N802
        self.bufs.pop(int(p))
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpy(self, dst, src, n, kind):  # noqa: N802
        import ctypes

        ctypes.memmove(int(dst), int(src), n)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        return self.cudaMemcpy(dst, src, n, kind)

    def cudaStreamCreate(self):  # noqa: N802
        self.calls["stream"] += 1
        return 0, 1

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, s):  # noqa: N802
        return (0,)

    def cudaGetDeviceCount(self):  # noqa: N802
        return 0, self.devices

    def cudaGetDeviceProperties(self, i):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Fake Orin\x00", major=8, minor=7)


def test_export_trt_builds_an_fp16_engine_with_torch_unimportable(monkeypatch, bundle_copy, capsys):
    """`python -m export.trt` (export/trt.py's main, no --tokens: every budget) on a runtime-only
    Jetson: torch blocked, the GPU queried through (fake) cuda-python."""
    import export.gates as eg
    import runtime.vision as rv
    from export.trt import main
    from runtime.bundle import verify_bundle

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt())
    monkeypatch.setattr(rv, "_cudart", FakeCudart)
    monkeypatch.setattr(et.importlib.util, "find_spec", lambda name: object() if name == "cuda" else None)
    ok = {"parity": {"cosine": 1.0, "max_abs": 0.0}, "latency_ms": {"median": 1.0}}
    monkeypatch.setattr(eg, "engine_gate", lambda *a: ok)
    assert main(["--bundle", str(bundle_copy), "--fp16", "--max-batch", "2"]) == 0, capsys.readouterr().out
    m = verify_bundle(bundle_copy)
    assert sorted(m.vision.engines, key=int) == ["1", "9", "36", "144", "576"]  # no --tokens: all
    assert {e.gpu_name for e in m.vision.engines.values()} == {"Fake Orin"}
    assert {e.compute_capability for e in m.vision.engines.values()} == {"8.7"}
    with pytest.raises(ExportError, match="no CUDA GPU visible"):
        et.require_gpu(FakeCudart(devices=0))


def test_tensorrt_11_and_cuda_python_13_get_the_supported_range():
    eleven = types.SimpleNamespace(Builder=object, __version__="11.0.0.7")
    with pytest.raises(
        ExportError, match=r"TensorRT 11.0.0.7 found; this exporter supports TensorRT >=10,<11"
    ):
        et.require_tensorrt(lambda name: eleven)
    assert et.require_tensorrt(
        lambda name: types.SimpleNamespace(Builder=object, __version__="10.3.0")
    ).__version__
    with pytest.raises(ExportError, match=r"cuda-python 13.0.1 found; supported: >=12,<13"):
        et.check_cuda_python("13.0.1")
    et.check_cuda_python("12.6.2")


def test_the_trt_extra_pins_the_majors():
    import tomllib

    extra = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    trt = extra["project"]["optional-dependencies"]["trt"]
    assert any(r.startswith("tensorrt>=10,<11") for r in trt) and "cuda-python>=12,<13" in trt


def test_export_trt_on_tensorrt_11_refuses_with_the_range(monkeypatch, capsys):
    from export.cli import trt_main

    eleven = fake_trt()
    eleven.__version__ = "11.1.0"
    monkeypatch.setitem(sys.modules, "tensorrt", eleven)
    assert trt_main(["--tokens", "36", "--bundle", "nowhere", "--fp16"]) == 2
    out = capsys.readouterr().out
    assert "supports TensorRT >=10,<11" in out and "AttributeError" not in out


def test_int8_calibrates_pixels_at_the_calibration_batch(monkeypatch, tmp_path):
    """The calibration profile is the calibration batch's own shape (not the build profile's
    opt batch 1); the calibrator copies each full batch into one reused device buffer."""
    trt = fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda = FakeCudart()
    batches = iter([np.full((4, 3, 8, 8), v, np.float32) for v in (1.0, 2.0)])
    calib = et.make_calibrator(batches, 4, tmp_path / "c.calib", cudart=cuda)
    et.build_engine(tmp_path / "g.onnx", "pixel_values", opts(precision="int8", calib_batch=4), 336, calib)
    assert trt.calls["calib"].shapes == ("pixel_values", (4, 3, 336, 336), (4, 3, 336, 336), (4, 3, 336, 336))
    for v in (1.0, 2.0):
        (ptr,) = calib.get_batch(["pixel_values"])
        assert np.all(cuda.bufs[ptr].view(np.float32) == v)  # the whole batch, all 4 images
    assert calib.get_batch(["pixel_values"]) == [] and cuda.calls["malloc"] == 1 and not cuda.bufs


def fake_trt_runtime(bundle, max_batch=2):
    """fake_trt() plus what runtime.vision.TrtVision uses: each 'engine' runs its budget through
    onnxruntime (CPU), reading and writing the (fake) device buffers it is given."""
    import ctypes

    import onnxruntime as ort

    from runtime.bundle import verify_bundle

    trt = fake_trt()
    m = verify_bundle(bundle)
    calls = trt.calls.setdefault("contexts", [])
    trt.TensorIOMode = types.SimpleNamespace(INPUT="IN", OUTPUT="OUT")
    trt.nptype = lambda dtype: np.float32
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addr = engine, None, {}
            calls.append(self)

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= max_batch:
                return False
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], self.engine.t, m.vision.hidden_size)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shape)) * 4
            x = np.frombuffer(ctypes.string_at(self.addr[m.vision.input_name], n), np.float32).reshape(
                self.shape
            )
            out = m.vision.budgets[str(self.engine.t)].output
            y = np.ascontiguousarray(self.engine.session.run([out], {m.vision.input_name: x})[0], np.float32)
            ctypes.memmove(self.addr[out], y.ctypes.data, y.nbytes)
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self, t):
            self.t = t
            self.names = [m.vision.input_name, m.vision.budgets[str(t)].output]
            file = bundle / m.vision.budgets[str(t)].file
            self.session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "IN" if name == self.names[0] else "OUT"

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_profile_shape(self, name, i):
            s = m.vision.image_size
            return [(1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s)]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(int(data.decode().rsplit("t", 1)[1]))

    trt.Runtime = Runtime
    return trt


def test_an_engine_for_36_only_serves_36_and_refuses_a_forced_144(
    fake_build, bundle_copy, monkeypatch, caplog
):
    """Engines for a subset (the README's `--tokens 36`): both `tensorrt` and `auto` serve the
    budgets that have engines, say so at start, and refuse the others naming those they have."""
    import logging

    import runtime.vision as rv
    from export.cli import trt_main
    from runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(build=b"FAKE-ENGINE t36"))
    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "36", "--fp16", "--max-batch", "2"]) == 0
    trt = fake_trt_runtime(bundle_copy)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda = FakeCudart()
    monkeypatch.setattr(rv, "_cudart", lambda: cuda)
    image = np.zeros((1, 3, 336, 336), np.float32)
    for backend in ("tensorrt", "auto"):
        with caplog.at_level(logging.INFO, logger="runtime"):
            pipe = Pipeline.load(bundle_copy, backend=backend)
        assert pipe.vision.name == "tensorrt" and pipe.budgets == (36,)
        assert "serves budgets [36]" in caplog.text and "no engine for [576, 144, 9, 1]" in caplog.text
        assert pipe.providers["vision"] == ["TensorRT 10.13.0"]
        frame = np.full((48, 64, 3), 128, np.uint8)
        r = pipe.ask(frame, "What is in the picture?", max_new_tokens=2)
        assert r.budget == 36
        with pytest.raises(ValueError, match=r"144 visual tokens .*valid budgets: 36$"):
            pipe.ask(frame, "What is in the picture?", tokens=144, max_new_tokens=2)
    # parity with onnxruntime through the fake device buffers; the slot is cached across calls
    ref = rv.OrtVision(bundle_copy, pipe.manifest, "ort-cpu").encode(np.repeat(image, 2, 0), [36])[36]
    vision = pipe.vision
    contexts = len(trt.calls["contexts"])
    for _ in range(3):
        np.testing.assert_allclose(vision.encode(np.repeat(image, 2, 0), [36])[36], ref, rtol=1e-6, atol=1e-6)
    assert len(trt.calls["contexts"]) == contexts  # no context, stream or buffer per call
    with pytest.raises(ValueError, match=r"outside engine t36's profile"):
        vision.encode(np.repeat(image, 3, 0), [36])
    vision.close()


def test_trt_slots_are_bounded_under_concurrency(fake_build, bundle_copy, monkeypatch):
    import threading

    import runtime.vision as rv
    from export.cli import trt_main
    from runtime.bundle import verify_bundle

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(build=b"FAKE-ENGINE t9"))
    assert trt_main(["--bundle", str(bundle_copy), "--tokens", "9", "--max-batch", "2"]) == 0
    trt = fake_trt_runtime(bundle_copy)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda = FakeCudart()
    monkeypatch.setattr(rv, "_cudart", lambda: cuda)
    monkeypatch.setenv("FMVR_TRT_CONTEXTS", "2")
    vision = rv.TrtVision(bundle_copy, verify_bundle(bundle_copy))
    image = np.zeros((1, 3, 336, 336), np.float32)
    errors = []

    def work():
        try:
            for _ in range(3):
                assert vision.encode(image, [9])[9].shape[:2] == (1, 9)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and 1 <= len(trt.calls["contexts"]) <= 2 and cuda.calls["stream"] <= 2
    vision.close()
    assert not cuda.bufs  # every device and pinned buffer freed
