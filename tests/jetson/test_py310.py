"""The torch-free runtime on the Jetson's Python and versions (constraints-jetson.txt: Python
3.10, numpy 2.2, onnxruntime 1.23, pillow 12), against a bundle built by the main venv.

    python tests/jetson/prepare.py DIR                       (main venv: bundle + reference)
    FMVR_JETSON_DIR=DIR python3.10 -m pytest --noconftest tests/jetson   (make test-jetson)

--noconftest: tests/conftest.py imports torch, which this environment does not have. In the
main suite these tests skip unless FMVR_JETSON_DIR is set.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
DIR = os.environ.get("FMVR_JETSON_DIR")
pytestmark = pytest.mark.skipif(
    not DIR, reason="the Python 3.10 job's tests (make test-jetson sets FMVR_JETSON_DIR)"
)


@pytest.fixture(scope="module")
def pipe():
    from runtime.pipeline import Pipeline

    return Pipeline.load(Path(DIR) / "bundle", backend="auto")


@pytest.fixture(scope="module")
def expected():
    return np.load(Path(DIR) / "expected.npz")


def test_this_is_the_jetson_stack():
    assert "torch" not in sys.modules
    if os.environ.get("FMVR_JETSON_STRICT"):
        import onnxruntime
        import PIL

        assert sys.version_info[:2] == (3, 10), sys.version
        assert (np.__version__, onnxruntime.__version__, PIL.__version__) == ("2.2.6", "1.23.2", "12.3.0")


def test_every_core_runtime_module_imports_without_torch():
    import runtime

    skip = (
        "runtime.serve",
        "runtime.ros",
        "runtime.cluster.app",
        "runtime.__main__",
    )  # extras: server, ROS 2, Ray
    names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]
    for name in names:
        if not name.startswith(skip):
            importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "tensorrt")]


def test_auto_picks_cpu_and_reports_the_providers_it_got(pipe):
    assert pipe.vision.name == "ort-cpu"
    assert pipe.providers == {"vision": ["CPUExecutionProvider"], "llm": ["CPUExecutionProvider"]}
    assert pipe.budgets == (576, 144, 36, 9, 1)


def test_vision_features_match_the_main_venv(pipe, expected):
    from prepare import frame

    feats = pipe.vision.encode(frame()[None], list(pipe.budgets))
    for t, f in feats.items():
        ref = expected[f"t{t}"]
        assert f.shape == ref.shape
        np.testing.assert_allclose(f, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_an_answer_end_to_end(pipe, expected):
    from prepare import frame

    r = pipe.ask(frame(), "What is in the picture?", tokens=36, max_new_tokens=8)
    assert r.budget == 36 and r.answer == str(expected["answer"])


def test_a_profile_round_trip_records_providers(pipe, tmp_path):
    from runtime.profile import Profile

    prof = pipe.measure_profile(warmup=0, runs=1, save=False)
    assert prof.providers["vision"] == ["CPUExecutionProvider"]
    again = Profile.from_dict(prof.to_dict())
    assert again.providers == prof.providers and again.vision_ms.keys() == prof.vision_ms.keys()
