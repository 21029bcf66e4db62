"""Prepare the Python 3.10 (Jetson-versions) runtime job: `python tests/jetson/prepare.py DIR`.

Run by the main venv (torch, export): builds the untrained tiny bundle (uint8 frames in, int8
cpu-target decoder) into DIR/bundle, and the reference the 3.10 job compares with: the vision
features and the greedy answer of a fixed frame through runtime.pipeline (onnxruntime CPU,
constraints.txt's numpy/onnxruntime), in DIR/expected.npz. tests/jetson/test_py310.py then runs
in a venv made from constraints-jetson.txt (Python 3.10, no torch) with FMVR_JETSON_DIR=DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def frame() -> np.ndarray:
    """A fixed 120x200 RGB frame (no files, no randomness across numpy versions)."""
    y, x = np.mgrid[0:120, 0:200]
    return np.stack([(x * 255) // 199, (y * 255) // 119, ((x + y) * 3) % 256], -1).astype(np.uint8)


def main(out: str) -> None:
    from export import build_tiny_bundle
    from runtime.pipeline import Pipeline

    root = Path(out)
    bundle = build_tiny_bundle(root / "bundle", quant="int8", force=True)
    pipe = Pipeline.load(bundle, backend="ort-cpu")
    x = frame()[None]  # [1, H, W, 3]
    feats = pipe.vision.encode(x, list(pipe.budgets))
    r = pipe.ask(frame(), "What is in the picture?", tokens=36, max_new_tokens=8)
    np.savez(
        root / "expected.npz",
        answer=np.array(r.answer),
        **{f"t{t}": f for t, f in feats.items()},
    )
    print(f"prepared {bundle} and {root / 'expected.npz'}")


if __name__ == "__main__":
    main(sys.argv[1])
