"""Export FMVR-LLaVA to a deployable bundle (ONNX vision graphs, TensorRT engines, ONNX decoder).

Entry points: `python -m export` (everything), `python -m export.onnx`, `python -m export.trt`,
`python -m export.llm`. The bundle schema lives in runtime/bundle.py.

For other packages' tests (torch needed, imported lazily):

    build_tiny_bundle(out_dir, *, tokens="all", layout="shared", quant="fp32",
                      force=False, seed=0, preprocess="graph") -> pathlib.Path

builds the untrained tiny preset with a fixed seed and exports it into `out_dir`
(all budgets, fp32 vision, fp32 decoder unless quant="int8"|"int4"|None for none;
preprocess="graph": uint8 frames in, preprocessing in the graph; "host": pixels in).
`llm=` is the old name of `quant=` (kept for one release, with a FutureWarning).
"""

from __future__ import annotations

import warnings
from pathlib import Path


def build_tiny_bundle(
    out_dir: str | Path,
    *,
    tokens: str = "all",
    layout: str = "shared",
    quant: str | None = "fp32",
    force: bool = False,
    seed: int = 0,
    preprocess: str = "graph",
    **renamed: str,
) -> Path:
    """An untrained tiny bundle (fixed seed) at out_dir; see export.build.build_bundle."""
    from export.build import build_tiny

    if set(renamed) - {"llm"}:
        raise TypeError(
            f"build_tiny_bundle() got unexpected keyword arguments {sorted(set(renamed) - {'llm'})}"
        )
    if "llm" in renamed:
        warnings.warn(
            "build_tiny_bundle(llm=...) is deprecated and will be removed in the next release; use quant=",
            FutureWarning,
            stacklevel=2,
        )
        quant = renamed["llm"]
    return build_tiny(
        out_dir, tokens=tokens, layout=layout, quant=quant, force=force, seed=seed, preprocess=preprocess
    )
