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
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return types.SimpleNamespace(
                node=lambda: 7,
                node_name=lambda: "/x",
                node_operator=lambda: "Foo",
                desc=lambda: "no importer",
            )

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, Parser
    trt.float32, trt.int64 = "FLOAT", "INT64"
    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(
        FP16="FP16", INT8="INT8", TF32="TF32", PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS"
    )
    trt.Dims = tuple
    return trt


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
