"""Provider truth, the decoder's provider, onnxruntime's TensorRT options, and the install's
metadata (issue #27): what each backend's sessions actually got, refused when a GPU provider
silently fell back to CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import runtime.vision as rv
from runtime.bundle import BundleError, verify_bundle
from runtime.pipeline import decoder_providers

ROOT = Path(__file__).resolve().parents[2]


def test_a_silent_fall_back_to_cpu_is_refused_or_loudly_allowed(monkeypatch, caplog):
    cpu = ["CPUExecutionProvider"]
    assert rv.check_providers(cpu, "CPUExecutionProvider", "x") == cpu
    got = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert rv.check_providers(got, "CUDAExecutionProvider", "x") == got
    monkeypatch.delenv("FMVR_ALLOW_PROVIDER_FALLBACK", raising=False)
    with pytest.raises(
        BundleError, match=r"vision all.onnx: asked onnxruntime for TensorrtExecutionProvider.*FMVR_ALLOW"
    ):
        rv.check_providers(cpu, "TensorrtExecutionProvider", "vision all.onnx")
    monkeypatch.setenv("FMVR_ALLOW_PROVIDER_FALLBACK", "1")
    with caplog.at_level(logging.WARNING, logger="runtime"):
        assert rv.check_providers(cpu, "CUDAExecutionProvider", "decoder") == cpu
    assert "PROVIDER FALLBACK" in caplog.text


def test_ort_cuda_backend_refuses_a_session_that_got_only_cpu(tiny_bundle, monkeypatch):
    """onnxruntime builds the session even when CUDA fails to load; the backend checks get_providers()."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])  # CUDA "failed"

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.delenv("FMVR_ALLOW_PROVIDER_FALLBACK", raising=False)
    m = verify_bundle(tiny_bundle)
    with pytest.raises(BundleError, match="asked onnxruntime for CUDAExecutionProvider, the session got"):
        rv.OrtVision(tiny_bundle, m, "ort-cuda")
    monkeypatch.setenv("FMVR_ALLOW_PROVIDER_FALLBACK", "1")
    assert rv.OrtVision(tiny_bundle, m, "ort-cuda").providers == ["CPUExecutionProvider"]


def test_the_pipeline_and_its_profile_report_the_providers(pipe):
    assert pipe.providers == {"vision": ["CPUExecutionProvider"], "llm": ["CPUExecutionProvider"]}
    try:
        prof = pipe.measure_profile(warmup=0, runs=1, save=False)
        assert prof.to_dict()["providers"] == pipe.providers
        assert type(prof).from_dict(prof.to_dict()).providers == pipe.providers
    finally:
        pipe.reload_profile()  # back to the session bundle's state: no profile (test_server relies on it)


def test_the_decoder_follows_its_quantization_target(tiny_bundle, monkeypatch):
    import onnxruntime as ort

    m = verify_bundle(tiny_bundle)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    m.llm.quantization["target"] = "cpu"  # MatMulNBits for the CPU: never on CUDA
    assert decoder_providers(m, "ort-cuda") == ["CPUExecutionProvider"]
    m.llm.quantization["target"] = "cuda"
    assert decoder_providers(m, "ort-cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert decoder_providers(m, "tensorrt")[0] == "CUDAExecutionProvider"
    assert decoder_providers(m, "ort-cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert decoder_providers(m, "ort-cuda") == ["CPUExecutionProvider"]


def test_ort_tensorrt_options_cache_engines_and_cover_the_profile(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("FMVR_TRT_CACHE", str(tmp_path))
    m = verify_bundle(tiny_bundle)
    o = rv.ort_trt_options(tiny_bundle, m)
    assert o["trt_engine_cache_enable"] == "True" and Path(o["trt_engine_cache_path"]).parent == tmp_path
    assert o["trt_timing_cache_enable"] == "True"
    name, s = m.vision.input_name, m.vision.image_size
    if m.vision.preprocess is None:
        assert o["trt_profile_max_shapes"] == f"{name}:4x3x{s}x{s}" and o["trt_fp16_enable"] == "True"
    else:
        spec = m.vision.preprocess
        assert o["trt_profile_min_shapes"] == f"{name}:1x1x1x3"
        assert o["trt_profile_max_shapes"] == f"{name}:4x{spec.max_height}x{spec.max_width}x3"
        assert o["trt_fp16_enable"] == "False"  # the in-graph preprocessing rounds in fp32


def test_the_tensorrt_backend_refuses_tensorrt_11_naming_the_range(tiny_bundle, monkeypatch):
    monkeypatch.setattr(rv, "trt_device", lambda: ("11.0.0", "8.7"))
    with pytest.raises(
        BundleError, match=r"TensorRT 11.0.0 found; the tensorrt backend supports TensorRT >=10,<11"
    ):
        rv.choose_backend(tiny_bundle, verify_bundle(tiny_bundle), "tensorrt")


def requirements(extra: str | None, machine: str) -> list[str]:
    """The distributions `pip install .[extra]` asks for on Linux/`machine`, Python 3.10."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    env = {
        "platform_machine": machine,
        "sys_platform": "linux",
        "python_version": "3.10",
        "extra": extra or "",
    }
    return sorted(r.name for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate(env))


def test_a_jetson_install_does_not_pull_cpu_onnxruntime_over_onnxruntime_gpu():
    assert requirements(None, "aarch64") == ["numpy", "pillow", "tokenizers"]
    assert requirements(None, "x86_64") == ["numpy", "onnxruntime", "pillow", "tokenizers"]
    assert "onnxruntime" in requirements("cpu", "aarch64")  # aarch64 machines that are not Jetsons
    assert "onnxruntime-gpu" not in requirements("gpu", "aarch64")  # no PyPI wheel: NVIDIA's
    assert "tensorrt" not in requirements("trt", "aarch64") and "cuda-python" in requirements(
        "trt", "aarch64"
    )


def test_constraints_jetson_pins_the_python_310_aarch64_versions():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints-jetson.txt").read_text().splitlines()
        if "==" in line
    )
    assert (pins["numpy"], pins["onnxruntime"], pins["pillow"]) == ("2.2.6", "1.23.2", "12.3.0")
    assert "torch" not in pins


def test_a_missing_onnxruntime_names_what_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "runtime.llm")
    with pytest.raises(ImportError, match=r"onnxruntime-gpu for your JetPack.*fmvr-edge\[cpu\]"):
        importlib.import_module("runtime.llm")
    monkeypatch.undo()
    importlib.import_module("runtime.llm")


def test_the_vision_sessions_stop_spinning_when_their_run_ends(pipe):
    # The LLM's prefill follows the vision pass on the same cores: a vision pool still spinning
    # after its Run would take them (runtime/vision.py, STOP_SPINNING).
    from runtime.vision import STOP_SPINNING

    sessions = [
        *pipe.vision.sessions.values(),
        *([pipe.vision.pre_session] if pipe.vision.pre_session else []),
    ]
    assert sessions
    for s in sessions:
        assert s.get_session_options().get_session_config_entry(STOP_SPINNING) == "1"
