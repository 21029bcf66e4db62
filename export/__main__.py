"""python -m export: everything into one verified bundle (the command: export.cli.export_main).

    python -m export --checkpoint CKPT --out BUNDLE [--tokens all] [--layout shared|per-budget]
                     [--fp16] [--opset 18] [--quant int8|int4|fp32|fp16|none] [--target cpu|cuda]
                     [--exporter auto|genai|dynamo] [--block-size 32] [--force]
    python -m export --demo-tiny --out BUNDLE     (untrained tiny model, for trying the plumbing)

Written to a temporary directory beside BUNDLE and swapped in at the end: an interrupted
export leaves no bundle (or the old one). TensorRT engines are built on the target device
afterwards with `python -m export.trt --bundle BUNDLE --tokens T`. `--llm` is the old
spelling of `--quant` (kept for one release, with a FutureWarning).
"""

from __future__ import annotations

from export.cli import export_main as main

if __name__ == "__main__":
    raise SystemExit(main())
