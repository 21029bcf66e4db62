"""GPU paths (skipped without an NVIDIA GPU): onnxruntime CUDA with IO binding on the device,
and native TensorRT engines. Each must give the CPU pipeline's greedy answers."""

from __future__ import annotations

import pytest

from runtime.pipeline import Pipeline

PROMPT = "What is in the picture?"


def _providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(tiny_bundle, pipe, image_bytes):
    if "CUDAExecutionProvider" not in _providers():
        pytest.skip(
            "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
        )
    gpu = Pipeline.load(tiny_bundle, backend="ort-cuda")
    assert gpu.decoder.device == "cuda" and gpu.vision.name == "ort-cuda"
    for t in (576, 36, 1):
        want = pipe.ask(image_bytes[0], PROMPT, tokens=t, max_new_tokens=12).token_ids
        got = gpu.ask(image_bytes[0], PROMPT, tokens=t, max_new_tokens=12)
        assert got.token_ids == want and got.backend == "ort-cuda"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_backend(tiny_bundle, tmp_path, image_bytes, pipe):
    import shutil
    import subprocess
    import sys

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    subprocess.run(
        [sys.executable, "-m", "export.trt", "--bundle", str(bundle), "--tokens", "36"], check=True
    )
    trt = Pipeline.load(bundle, backend="tensorrt")
    r = trt.ask(image_bytes[0], PROMPT, tokens=36, max_new_tokens=4)
    assert r.backend == "tensorrt"
    assert r.token_ids[:1] == pipe.ask(image_bytes[0], PROMPT, tokens=36, max_new_tokens=4).token_ids[:1]
