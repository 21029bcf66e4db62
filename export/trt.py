"""python -m export.trt: TensorRT engines for a bundle's vision graphs, on the device that runs them.

    python -m export.trt --tokens 36 [--bundle B | --checkpoint CKPT] [--fp16]
                         [--int8 --calib-images DIR] [--min-batch 1 --opt-batch 1 --max-batch 4]
                         [--workspace-gb 2] [--timing-cache FILE]

The command is export.cli.trt_main; the library it runs is export.engines.
"""

from __future__ import annotations

from export.cli import trt_main as main

if __name__ == "__main__":
    raise SystemExit(main())
