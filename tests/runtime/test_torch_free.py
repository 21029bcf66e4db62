"""Every runtime module imports with torch and transformers made unimportable."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

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
    names = [f"runtime.{m.name}" for m in pkgutil.iter_modules(runtime.__path__)]
    assert {"runtime.pipeline", "runtime.server", "runtime.llm", "runtime.vision"} <= set(names)
    return ["runtime", *sorted(names)]


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
