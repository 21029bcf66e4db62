"""Everything into one verified bundle.

    python -m export --checkpoint CKPT --out BUNDLE [--tokens all] [--layout shared|per-budget]
                     [--llm int8|int4|fp32|fp16|none] [--target cpu|cuda] [--force]
    python -m export --demo-tiny --out BUNDLE     (untrained tiny model, for trying the plumbing)

Written to a temporary directory beside BUNDLE and renamed at the end: an interrupted
export leaves no bundle. TensorRT engines are built on the target device afterwards with
`python -m export.trt --bundle BUNDLE --tokens T`.
"""

from __future__ import annotations

import argparse

from export.common import USER_ERRORS, add_source_args, load_source, parse_tokens
from runtime.bundle import LAYOUTS


def build_parser() -> argparse.ArgumentParser:
    from export.llm import EXPORTERS, QUANTS, TARGETS

    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--out", default="bundle", help="bundle directory to create (default: bundle)")
    p.add_argument("--tokens", default="all", help="visual-token budgets: all, 36 or 1,9,36 (default all)")
    p.add_argument(
        "--layout", default="shared", choices=LAYOUTS, help="vision graphs: one shared or one per budget"
    )
    p.add_argument("--fp16", action="store_true", help="export the vision graphs in float16")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the vision graphs (default 18)")
    p.add_argument(
        "--llm", default="int8", choices=(*QUANTS, "none"), help="decoder precision (default int8)"
    )
    p.add_argument("--target", default="cpu", choices=TARGETS, help="where the decoder runs (default cpu)")
    p.add_argument(
        "--exporter", default="auto", choices=EXPORTERS, help="decoder exporter (auto: genai builder)"
    )
    p.add_argument("--block-size", type=int, default=32, help="int4 quantization block size (default 32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    from export.build import build_bundle, print_summary
    from export.llm import check_block_size

    args = build_parser().parse_args(argv)
    try:
        check_block_size(args.block_size)
        src = load_source(args)
        budgets = parse_tokens(args.tokens, tuple(src.model.cfg.budgets))
        out, manifest = build_bundle(
            src, args.out, budgets=budgets, layout=args.layout, fp16=args.fp16, opset=args.opset,
            llm=None if args.llm == "none" else args.llm, target=args.target, exporter=args.exporter,
            block_size=args.block_size, force=args.force,
        )  # fmt: skip
    except USER_ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    t = 36 if 36 in budgets else budgets[-1]
    if manifest.llm is not None:
        print(
            f'\nnext: python -m runtime ask --bundle {out} --image photo.jpg --question "What is in the picture?" --tokens {t}'
        )
    print(f"      on a GPU/Jetson: python -m export.trt --bundle {out} --tokens {t} --fp16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
