"""Shared tiny fixtures. Nothing here downloads: configs and tokenizer are built in-process,
real photos come from scikit-learn's bundled sample images."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one intra-op thread is as fast as two and keeps the 2-core machine responsive
# when torchrun tests or ONNX Runtime sessions run beside torch.
torch.set_num_threads(1)


def _has_cuda_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _has_tensorrt() -> bool:
    """A real TensorRT: tensorrt-stubs alone leaves an importable `tensorrt` of .pyi files."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def pytest_collection_modifyitems(config, items):
    gpu, trt = _has_cuda_gpu(), _has_tensorrt()
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU; none here")
    no_trt = pytest.mark.skip(
        reason="needs TensorRT (JetPack on Jetson; NVIDIA's pip index on x86); not installed"
    )
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        elif "tensorrt" in item.keywords and not trt:
            item.add_marker(no_trt)


@pytest.fixture(scope="session")
def tiny_cfg():
    from fmvr.config import preset

    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fmvr.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_cfg):
    from fmvr.model import build_model

    return build_model(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def real_images():
    """Two real photographs (RGB PIL images, 427x640) bundled with scikit-learn."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


@pytest.fixture(scope="session")
def small_cfg():
    from fmvr.config import preset

    return preset("small")


@pytest.fixture(scope="session")
def small_model(small_cfg):
    """The `small` preset with its packaged weights (EfficientNet-Lite0 + SmolLM2-135M): ~5 s
    once the SmolLM2 cache exists (~15 s the first time on a machine)."""
    from fmvr.model import build_model

    return build_model(small_cfg, seed=0)


@pytest.fixture(scope="session")
def small_tokenizer(small_cfg):
    from fmvr.tokenizer import preset_tokenizer

    return preset_tokenizer(small_cfg)


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of benchmarks/ (not a package) as a module: benchmark_script("tower_probe")."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def synthetic_profile():
    """A device profile with round numbers (ms): vision 40/20/10/8/7 at 576/144/36/9/1 tokens,
    prefill 1 + 0.1 per token, decode 2 per token, preprocessing 1 (runtime and cluster tests)."""
    from runtime.profile import Profile

    vision = {576: 40.0, 144: 20.0, 36: 10.0, 9: 8.0, 1: 7.0}
    return Profile(
        device={"cpu": "test-cpu", "machine": "x86_64", "provider": "CPUExecutionProvider"},
        backend="ort-cpu",
        vision_ms={t: {"p50": v, "p90": v * 1.1, "n": 5} for t, v in vision.items()},
        prefill_intercept_ms=1.0,
        prefill_ms_per_token=0.1,
        decode_ms_per_token=2.0,
        preprocess_ms=1.0,
    )
