"""Vision export: CLIP tower + projector + pyramid -> ONNX, per budget or one shared graph.

    python -m export.onnx --checkpoint CKPT --tokens 36|1,9,36|all --layout per-budget|shared
                          --out BUNDLE [--fp16] [--opset 18] [--force]

Each graph: pixel_values [batch, 3, S, S] -> tokens_<T> [batch, T, D] (dynamic batch),
torch.onnx.export(dynamo=True), onnx.checker, then onnxruntime vs PyTorch fp32 on real
images (max abs error and cosine per budget), recorded in the manifest. Past tolerance the
command exits non-zero and leaves no bundle.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.common import USER_ERRORS, ExportError, add_source_args, compare, load_source, parse_tokens
from runtime.bundle import LAYOUTS, FileEntry, VisionOutput, VisionSection, file_entry

# Parity tolerances against PyTorch fp32 on the same preprocessed images. The absolute bound
# scales with the output's magnitude past 1: fp32 rounding is relative, and trained FMVR stages
# (5x per stage at init) reach |x| ~ 1e3 at 9 tokens, where 1e-4 absolute is below fp32 eps.
FP32_MAX_ABS = 1e-4
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit, with margin


def graph_files(budgets: tuple[int, ...], layout: str, fp16: bool) -> dict[str, tuple[int, ...]]:
    """Bundle-relative graph path -> the budgets it outputs."""
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    suffix = ".fp16.onnx" if fp16 else ".onnx"
    if layout == "shared":
        return {f"vision/all{suffix}": tuple(budgets)}
    return {f"vision/t{t}{suffix}": (t,) for t in budgets}


def export_graph(model: Any, budgets: tuple[int, ...], path: Path, fp16: bool, opset: int) -> list[str]:
    """Trace VisionExport at `budgets` into `path`; returns the output names."""
    import onnx
    import torch

    from export.wrap import INPUT_NAME, VisionExport

    module = VisionExport(copy.deepcopy(model).half() if fp16 else model, budgets).eval()
    size = model.cfg.vision.image_size
    dtype = torch.float16 if fp16 else torch.float32
    sample = torch.zeros(2, 3, size, size, dtype=dtype)  # [2, 3, S, S]: batch 2 keeps the dim dynamic
    batch = torch.export.Dim("batch", min=1, max=1024)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=module.output_names,
            dynamic_shapes={"pixel_values": {0: batch}},
            external_data=external,
            verbose=False,
        )
    onnx.checker.check_model(str(path))  # path form: works with external data too
    return module.output_names


def run_onnx(path: Path, pixels: np.ndarray, fp16: bool) -> dict[str, np.ndarray]:
    """All outputs of a vision graph on the CPU provider: {name: [B, T, D] float32}."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: pixels.astype(np.float16 if fp16 else np.float32)}
    names = [o.name for o in sess.get_outputs()]
    return {n: v.astype(np.float32) for n, v in zip(names, sess.run(names, feed))}


def reference(model: Any, pixels: np.ndarray, budgets: tuple[int, ...]) -> dict[int, np.ndarray]:
    """PyTorch fp32 features {T: [B, T, D]}."""
    import torch

    with torch.no_grad():
        feats = model.encode_budgets(torch.from_numpy(pixels), tuple(budgets))
    return {t: f.numpy() for t, f in feats.items()}


def judge(stats: dict[str, float], fp16: bool) -> bool:
    if fp16:
        return stats["cosine"] >= FP16_MIN_COSINE
    limit = FP32_MAX_ABS * max(1.0, stats["ref_max_abs"])
    return stats["max_abs"] <= limit and stats["cosine"] >= FP32_MIN_COSINE


def parity(
    path: Path,
    budgets: tuple[int, ...],
    ref: dict[int, np.ndarray],
    pixels: np.ndarray,
    fp16: bool,
    images: list[str],
) -> dict[str, dict[str, Any]]:
    """{str(T): {max_abs, cosine, ok, tolerance, images, reference}} for one graph."""
    from export.wrap import output_name

    got = run_onnx(path, pixels, fp16)
    tol = (
        f"cosine >= {FP16_MIN_COSINE}"
        if fp16
        else f"max_abs <= {FP32_MAX_ABS} x max(1, max|ref|), cosine >= {FP32_MIN_COSINE}"
    )
    out = {}
    for t in budgets:
        stats = compare(ref[t], got[output_name(t)])
        out[str(t)] = {**stats, "ok": judge(stats, fp16), "tolerance": tol, "images": images,
                       "reference": "pytorch fp32", "provider": "CPUExecutionProvider"}  # fmt: skip
    return out


def write_vision(
    model: Any,
    root: Path,
    budgets: tuple[int, ...],
    layout: str,
    fp16: bool,
    opset: int,
    pixels: np.ndarray,
    images: list[str],
) -> tuple[VisionSection, list[FileEntry]]:
    """Export, check and hash the vision graphs into bundle dir `root`.

    Raises ExportError (listing every budget out of tolerance) when parity fails.
    """
    ref = reference(model, pixels, budgets)
    section = VisionSection(
        layout=layout,
        input_name="pixel_values",
        input_dtype="float16" if fp16 else "float32",
        image_size=model.cfg.vision.image_size,
        hidden_size=model.cfg.text.hidden_size,
        budgets={},
    )
    entries, failures = [], []
    for rel, graph_budgets in graph_files(budgets, layout, fp16).items():
        names = export_graph(model, graph_budgets, root / rel, fp16, opset)
        record = parity(root / rel, graph_budgets, ref, pixels, fp16, images)
        failures += [f"{rel} T={t}: max_abs {r['max_abs']:.3g}, cosine {r['cosine']:.6f} ({r['tolerance']})"
                     for t, r in record.items() if not r["ok"]]  # fmt: skip
        for t, name in zip(graph_budgets, names):
            section.budgets[str(t)] = VisionOutput(file=rel, output=name)
        shapes: dict[str, list[Any]] = {"pixel_values": ["batch", 3, section.image_size, section.image_size]}
        shapes.update({n: ["batch", t, section.hidden_size] for t, n in zip(graph_budgets, names)})
        prec = "fp16" if fp16 else "fp32"
        entries.append(file_entry(root, rel, "vision-onnx", precision=prec, budgets=list(graph_budgets),
                                  shapes=shapes, parity=record))  # fmt: skip
        data = root / (rel + ".data")
        if data.is_file():
            entries.append(file_entry(root, rel + ".data", "vision-data", precision=prec))
    if failures:
        raise ExportError(
            "ONNX output differs from PyTorch past tolerance (no bundle written):\n  " + "\n  ".join(failures)
        )
    return section, entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--tokens", default="all", help="budgets to export: 36, 1,9,36 or all (default all)")
    p.add_argument(
        "--layout", default="shared", choices=LAYOUTS, help="one graph per budget, or one shared graph"
    )
    p.add_argument("--out", default="bundle", help="bundle directory to create (default: bundle)")
    p.add_argument("--fp16", action="store_true", help="export the graph in float16 (input float16 too)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    from export.build import build_bundle, print_summary

    args = build_parser().parse_args(argv)
    try:
        src = load_source(args)
        budgets = parse_tokens(args.tokens, tuple(src.model.cfg.budgets))
        out, manifest = build_bundle(src, args.out, budgets=budgets, layout=args.layout, fp16=args.fp16,
                                     opset=args.opset, llm=None, force=args.force)  # fmt: skip
    except USER_ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    t = 36 if 36 in budgets else budgets[0]
    print(
        f"next: python -m export.trt --bundle {out} --tokens {t} --fp16   (on the GPU/Jetson that will run it)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
