"""python -m export.onnx: the vision graphs into a new bundle, without an LLM.

    python -m export.onnx --checkpoint CKPT --out BUNDLE [--tokens all] [--layout shared|per-budget]
                          [--fp16] [--opset 18] [--force]

The command is export.cli.onnx_main; the library it runs is export.graphs (via export.build).
"""

from __future__ import annotations

from export.cli import onnx_main as main

if __name__ == "__main__":
    raise SystemExit(main())
