"""python -m export.trt: TensorRT engines for a bundle's vision graphs, on the device that runs them.

    python -m export.trt [--tokens all] [--bundle B | --checkpoint CKPT] [--fp16]
                         [--int8 --calib-images DIR] [--min-batch 1 --opt-batch 1 --max-batch 4]
                         [--workspace-gb 2] [--timing-cache FILE]

Without --tokens it builds every budget of the bundle (a subset serves only those budgets:
runtime.vision's TensorRT backend serves the budgets that have engines). No torch needed:
cuda-python queries the GPU. The command is export.cli.trt_main; the library it runs is
export.engines.
"""

from __future__ import annotations

import sys

from export.cli import trt_main


def main(argv: list[str] | None = None) -> int:
    return trt_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
