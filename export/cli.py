"""The export commands, their argument parsing defined once.

    python -m export       --checkpoint CKPT --out BUNDLE [--tokens all] [vision] [llm] [--force]
    python -m export.onnx  --checkpoint CKPT --out BUNDLE [--tokens all] [vision] [--force]
    python -m export.llm   --checkpoint CKPT --out BUNDLE [llm] [--force]
    python -m export.trt   --tokens 36 [--bundle BUNDLE | --checkpoint CKPT] [--fp16 | --int8 ...]

    vision: --layout shared|per-budget  --fp16  --opset 18
            --preprocess graph|host  --max-frame 1920x1920              -> VisionOptions
    llm:    --quant int4|int8|fp16|fp32  --target cpu|cuda
            --exporter auto|genai|dynamo  --block-size 32               -> LLMOptions

Each argument group is declared once here and turned into its options record once. The
layers: export/onnx.py, llm.py, trt.py and __main__.py (the `python -m` entry points, a line
each) -> export.cli (parsing) -> export.build (bundle assembly) -> export.graphs (vision ONNX),
export.decoder (LLM), export.engines (TensorRT) -> export.gates (checks through runtime/).
Each takes the options records; none calls back up.
`--demo-tiny` replaces --checkpoint with an UNTRAINED tiny model (for trying the plumbing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.common import USER_ERRORS, ExportError, Source, load_source, parse_tokens
from export.options import EXPORTERS, PREPROCESS, QUANTS, TARGETS, LLMOptions, VisionOptions
from fmvr.staging import NotEnoughSpace
from runtime.bundle import LAYOUTS

ASK = 'python -m runtime ask --bundle {out} --image photo.jpg --prompt "What is in the picture?"'

ERRORS = (*USER_ERRORS, NotEnoughSpace)  # + a refusal before writing (fmvr.staging.check_space)


# ---- argument groups ---------------------------------------------------------------------------------


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="checkpoint directory written by fmvr.checkpoint.save_checkpoint")
    g.add_argument(
        "--demo-tiny",
        action="store_true",
        help="no checkpoint: build the tiny preset with a fixed seed (UNTRAINED, plumbing demo only)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of --demo-tiny's random weights")


def add_tokens_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="all", help="visual-token budgets: 36, 1,9,36 or all (default all)")


def add_vision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vision graphs (VisionOptions)")
    g.add_argument("--layout", default="shared", choices=LAYOUTS, help="one shared graph or one per budget")
    g.add_argument("--fp16", action="store_true", help="export the vision graphs in float16 (input too)")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset of the vision graphs (default 18)")
    g.add_argument(
        "--preprocess",
        default="graph",
        choices=PREPROCESS,
        help="graph (default): the graphs take uint8 RGB frames [B,H,W,3] at their own size and pad, "
        "resize (PIL bicubic) and normalise themselves, on the accelerator too; host: they take "
        "pixels [B,3,S,S] from fmvr.preprocess",
    )
    g.add_argument(
        "--max-frame",
        default="1920x1920",
        help="largest frame WIDTHxHEIGHT a --preprocess graph bundle takes (default 1920x1920; "
        "sets the TensorRT profile's maximum)",
    )


def add_llm_args(p: argparse.ArgumentParser, allow_none: bool) -> None:
    g = p.add_argument_group("LLM decoder (LLMOptions)")
    choices = (*QUANTS, "none") if allow_none else QUANTS
    none = "; none: a vision-only bundle" if allow_none else ""
    g.add_argument(
        "--quant", default="int8", choices=choices, help=f"decoder quantization (default int8{none})"
    )
    g.add_argument("--target", default="cpu", choices=TARGETS, help="where the decoder runs (default cpu)")
    g.add_argument(
        "--exporter",
        default="auto",
        choices=EXPORTERS,
        help="auto = onnxruntime-genai builder where supported",
    )
    g.add_argument(
        "--block-size", type=int, default=32, help="int4/int8 block size (power of 2, >= 16; default 32)"
    )
    g.add_argument(
        "--kv-cache-mb",
        type=float,
        default=None,
        help="the KV memory budget the manifest records: the KV caches of all requests running at "
        "once stay within it (default: one request at the model's full context)",
    )


def vision_options(args: argparse.Namespace) -> VisionOptions:
    return VisionOptions(
        layout=args.layout,
        precision="fp16" if args.fp16 else "fp32",
        opset=args.opset,
        preprocess=args.preprocess,
        max_frame=args.max_frame,
    )


def llm_options(args: argparse.Namespace) -> LLMOptions | None:
    if args.quant == "none":
        return None
    return LLMOptions(
        quant=args.quant,
        target=args.target,
        exporter=args.exporter,
        block_size=args.block_size,
        kv_cache_mb=args.kv_cache_mb,
    )


def source(args: argparse.Namespace) -> Source:
    return load_source(args.checkpoint, args.demo_tiny, args.seed)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


# ---- python -m export ----------------------------------------------------------------------------------


def export_parser() -> argparse.ArgumentParser:
    p = parser("python -m export", "Everything into one verified bundle (written atomically).")
    add_source_args(p)
    p.add_argument("--out", default="bundle", help="bundle directory to create (default: bundle)")
    add_tokens_arg(p)
    add_vision_args(p)
    add_llm_args(p, allow_none=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """`python -m export`: vision graphs + decoder + tokenizer; --llm is the old --quant."""
    from export.build import build_bundle, print_summary

    args = export_parser().parse_args(argv)
    try:
        vision, llm = vision_options(args), llm_options(args)
        src = source(args)
        tokens = parse_tokens(args.tokens, tuple(src.model.cfg.budgets))
        out, manifest = build_bundle(src, args.out, tokens=tokens, vision=vision, llm=llm, force=args.force)
    except ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    t = 36 if 36 in tokens else tokens[-1]
    if manifest.llm is not None:
        print("\nnext: " + ASK.format(out=out) + f" --tokens {t}")
    print(f"      on a GPU/Jetson: python -m export.trt --bundle {out} --tokens {t} --fp16")
    return 0


# ---- python -m export.onnx -------------------------------------------------------------------------------


def onnx_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m export.onnx", "Vision graphs only: a bundle without an LLM (add one with export.llm)."
    )
    add_source_args(p)
    add_tokens_arg(p)
    p.add_argument("--out", default="bundle", help="bundle directory to create (default: bundle)")
    add_vision_args(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def onnx_main(argv: list[str] | None = None) -> int:
    from export.build import build_bundle, print_summary

    args = onnx_parser().parse_args(argv)
    try:
        vision = vision_options(args)
        src = source(args)
        tokens = parse_tokens(args.tokens, tuple(src.model.cfg.budgets))
        out, manifest = build_bundle(src, args.out, tokens=tokens, vision=vision, llm=None, force=args.force)
    except ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    t = 36 if 36 in tokens else tokens[0]
    print(f"next: python -m export.llm {' '.join(src.flags)} --out {out} --quant int8")
    print(
        f"      on the GPU/Jetson that will run it: python -m export.trt --bundle {out} --tokens {t} --fp16"
    )
    return 0


# ---- python -m export.llm ----------------------------------------------------------------------------------


def llm_parser() -> argparse.ArgumentParser:
    p = parser("python -m export.llm", "Add (or with --force replace) the LLM decoder of an existing bundle.")
    add_source_args(p)
    add_llm_args(p, allow_none=False)
    p.add_argument(
        "--out", default="bundle", help="existing bundle (from python -m export.onnx) to add the LLM to"
    )
    p.add_argument("--force", action="store_true", help="replace the bundle's existing LLM")
    return p


def llm_main(argv: list[str] | None = None) -> int:
    from export.build import add_llm, existing_bundle, print_summary

    args = llm_parser().parse_args(argv)
    try:
        llm = llm_options(args)
        assert llm is not None
        if not existing_bundle(args.out):
            raise ExportError(
                f"{args.out} is not a bundle yet: export the vision part first "
                f"(python -m export.onnx --checkpoint CKPT --out {args.out}) or everything at once "
                f"(python -m export --checkpoint CKPT --out {args.out} --quant {llm.quant})"
            )
        out, manifest = add_llm(source(args), args.out, llm, args.force)
    except ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    print("\nnext: " + ASK.format(out=out))
    return 0


# ---- python -m export.trt -------------------------------------------------------------------------------------


def trt_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m export.trt", "TensorRT engines for the vision graphs, built on the device that runs them."
    )
    add_tokens_arg(p)  # default all: every budget of the bundle
    p.add_argument("--bundle", help="existing bundle (python -m export / export.onnx); default ./bundle")
    add_source_args(p)
    g = p.add_argument_group("engine")
    g.add_argument("--fp16", action="store_true", help="allow fp16 kernels (recommended on Jetson)")
    g.add_argument(
        "--int8", action="store_true", help="INT8 post-training calibration (needs --calib-images)"
    )
    g.add_argument("--calib-images", help="folder of representative images for --int8")
    g.add_argument("--calib-batch", type=int, default=8, help="calibration batch size (default 8)")
    g.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile (default 1)")
    g.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    g.add_argument("--max-batch", type=int, default=4, help="largest batch of the profile (default 4)")
    g.add_argument(
        "--opt-frame",
        help="frame WIDTHxHEIGHT TensorRT tunes a frame-input bundle for (default 1280x720 within its "
        "--max-frame; the profile spans 1x1 to --max-frame)",
    )
    g.add_argument(
        "--workspace-gb", type=float, default=2.0, help="builder workspace limit in GiB (default 2)"
    )
    g.add_argument(
        "--timing-cache", help="timing cache file, read if present and updated (speeds up rebuilds)"
    )
    return p


def trt_main(argv: list[str] | None = None) -> int:
    from export import engines as trt
    from export.build import print_summary

    args = trt_parser().parse_args(argv)
    try:
        opts = trt.BuildOptions(
            precision=trt.precision_of(args.fp16, args.int8),
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            workspace_gb=args.workspace_gb,
            timing_cache=args.timing_cache,
            calib_images=args.calib_images,
            calib_batch=args.calib_batch,
            opt_frame=opt_frame(args.opt_frame),
        )
        trt.check_options(opts)
        trt_module, gpu = trt.require_tensorrt(), trt.require_gpu()
        bundle = prepare_bundle(args)
        m = trt.build_engines(trt_module, gpu, bundle, args.tokens, opts)
    except ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(bundle, m)
    print(trt.engines_summary(m))
    print(f"next: python -m runtime profile --bundle {bundle}")
    return 0


def opt_frame(text: str | None) -> tuple[int, int] | None:
    from export.framegraph import parse_frame_size

    try:
        return None if text is None else parse_frame_size(text)
    except ValueError as e:
        raise ExportError(f"--opt-frame: {e}") from None


def prepare_bundle(args: argparse.Namespace) -> Path:
    """The bundle to build into: --bundle, or export --checkpoint/--demo-tiny into it first
    (per-budget graphs, no LLM)."""
    target = Path(args.bundle or "bundle")
    if not (args.checkpoint or args.demo_tiny):
        return target
    from export.build import build_bundle

    if target.exists():
        raise ExportError(
            f"{target} already exists: drop --checkpoint/--demo-tiny to build engines for that "
            "bundle, or name a new --bundle path to export into"
        )
    src = source(args)
    tokens = parse_tokens(args.tokens, tuple(src.model.cfg.budgets))
    out, _ = build_bundle(src, target, tokens=tokens, vision=VisionOptions(layout="per-budget"), llm=None)
    return out
