"""Every runtime module, and the built-in benchmark the budget card uses, imports and runs with
torch and transformers made unimportable."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import fmvr.tasks
import runtime

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "transformers", "torchvision", "onnx", "onnxscript", "tensorrt", "cuda")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Blocker())
import importlib
for mod in MODULES:
    importlib.import_module(mod)
bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not bad, bad
print("imported", len(MODULES), "modules")
"""


def runtime_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]
    assert {"runtime.pipeline", "runtime.serve.server", "runtime.ros.node", "runtime.tools.card"} <= set(
        names
    )
    if importlib.util.find_spec("ray") is None:  # the cluster extra (`make cluster`) is not installed
        names = [n for n in names if n != "runtime.cluster.app"]
    tasks = [m.name for m in pkgutil.walk_packages(fmvr.tasks.__path__, "fmvr.tasks.")]
    return ["runtime", *sorted(n for n in names if not n.endswith("__main__")), "fmvr.tasks", *tasks]


def test_runtime_imports_without_torch():
    mods = runtime_modules()
    code = f"MODULES = {mods!r}\n" + BLOCKER
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(mods)} modules" in out.stdout


def test_the_blocker_blocks():
    code = "MODULES = ['torch']\n" + BLOCKER
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "blocked" in out.stderr


def test_the_public_api_and_the_benchmark_work_without_torch():
    """`from runtime import Pipeline, Frame, AskOptions` and the card's questions, torch blocked."""
    run = (
        "from runtime import AskOptions, Frame, Pipeline, Result\n"
        "from runtime.tools.card import bench_questions\n"
        "import numpy as np\n"
        "qs = bench_questions(1, 0)\n"
        "assert len(qs) == 5 and np.asarray(qs[0][0]).shape == (336, 336, 3)\n"
        "assert Pipeline.__name__ == 'Pipeline' and AskOptions().latency_ms is None\n"
        "print('answered', len(qs), Frame.__name__, Result.__name__)\n"
    )
    code = "MODULES = []\n" + BLOCKER + run
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "answered 5 Frame Result" in out.stdout
