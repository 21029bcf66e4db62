"""python -m export.llm: add (or with --force replace) the LLM decoder of an existing bundle.

    python -m export.llm --checkpoint CKPT --out BUNDLE [--quant int4|int8|fp16|fp32]
                         [--target cpu|cuda] [--exporter auto|genai|dynamo] [--block-size 32] [--force]

The command is export.cli.llm_main; the library it runs is export.decoder (via export.build).
"""

from __future__ import annotations

from export.cli import llm_main as main

if __name__ == "__main__":
    raise SystemExit(main())
