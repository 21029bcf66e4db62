"""Export FMVR-LLaVA to a deployable bundle (ONNX vision graphs, TensorRT engines, ONNX decoder).

Entry points: `python -m export` (everything), `python -m export.onnx`, `python -m export.trt`,
`python -m export.llm`. The bundle schema lives in runtime/bundle.py.

For other packages' tests (torch needed, imported lazily):

    build_tiny_bundle(out_dir, *, tokens="all", layout="shared", quant="fp32",
                      force=False, seed=0, preprocess="graph") -> pathlib.Path

builds the untrained tiny preset with a fixed seed and exports it into `out_dir`
(all budgets, fp32 vision, fp32 decoder unless quant="int8"|"int4"|None for none;
preprocess="graph": uint8 frames in, preprocessing in the graph; "host": pixels in).
"""

from __future__ import annotations

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
) -> Path:
    """An untrained tiny bundle (fixed seed) at out_dir; see export.build.build_bundle."""
    from export.build import build_tiny

    return build_tiny(
        out_dir, tokens=tokens, layout=layout, quant=quant, force=force, seed=seed, preprocess=preprocess
    )
