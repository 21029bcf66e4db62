"""Vision export: tower + projector + pyramid -> ONNX, per budget or one shared graph.

Each graph: pixel_values [batch, 3, S, S] -> tokens_<T> [batch, T, D] (dynamic batch),
torch.onnx.export(dynamo=True), then onnx.checker. With --preprocess graph (the default) the
preprocessing is put in front (export.framegraph): frames uint8 [batch, height, width, 3] in;
the same nodes alone go into vision/preprocess.onnx (frames -> pixel_values, for checks and
timing). The parity gate (export.gates) runs the written bundle through runtime.vision and
compares it with PyTorch (on fmvr.preprocess's pixels).

A library: `python -m export.onnx` (export/onnx.py -> export.cli -> export.build) calls it;
it calls nothing back.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from export.framegraph import FRAME_INPUT, METHOD, PIXELS_OUTPUT, add_frame_input, frame_only_model
from export.options import VisionOptions
from runtime.bundle import FileEntry, GraphPreprocess, VisionOutput, VisionSection, file_entry

EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit, with margin
PREPROCESS_GRAPH = "vision/preprocess.onnx"  # a frame-input bundle's preprocessing alone


def graph_files(tokens: tuple[int, ...], opts: VisionOptions) -> dict[str, tuple[int, ...]]:
    """Bundle-relative graph path -> the budgets it outputs."""
    suffix = ".fp16.onnx" if opts.fp16 else ".onnx"
    if opts.layout == "shared":
        return {f"vision/all{suffix}": tuple(tokens)}
    return {f"vision/t{t}{suffix}": (t,) for t in tokens}


def export_graph(model: Any, tokens: tuple[int, ...], path: Path, opts: VisionOptions) -> list[str]:
    """Trace VisionExport at budgets `tokens` into `path`; returns the output names."""
    import onnx
    import torch

    from export.wrap import INPUT_NAME, VisionExport

    module = VisionExport(copy.deepcopy(model).half() if opts.fp16 else model, tokens).eval()
    size = model.cfg.vision.image_size
    dtype = torch.float16 if opts.fp16 else torch.float32
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
            opset_version=opts.opset,
            input_names=[INPUT_NAME],
            output_names=module.output_names,
            dynamic_shapes={"pixel_values": {0: batch}},
            external_data=external,
            verbose=False,
        )
    onnx.checker.check_model(str(path))  # path form: works with external data too
    return module.output_names


def frame_input_graph(path: Path, cfg: Any, opts: VisionOptions) -> None:
    """Rewrite the tower graph at `path` to take uint8 frames (export.framegraph), in place."""
    import onnx

    from export.wrap import INPUT_NAME
    from fmvr.preprocess import Preprocessor

    model = add_frame_input(onnx.load(str(path)), INPUT_NAME, Preprocessor.from_config(cfg), opts.max_frame)
    data = path.with_name(path.name + ".data")
    external = data.is_file()
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, location=data.name)
    onnx.checker.check_model(str(path))


def vision_section(cfg: Any, opts: VisionOptions) -> VisionSection:
    """The manifest's vision section for these options (budgets filled in by write_vision)."""
    from export.wrap import INPUT_NAME

    pre = None
    if opts.frame_input:
        w, h = opts.max_frame
        pre = GraphPreprocess(
            input_name=FRAME_INPUT, max_height=h, max_width=w, method=METHOD, graph=PREPROCESS_GRAPH
        )
    return VisionSection(
        layout=opts.layout,
        input_name=FRAME_INPUT if pre else INPUT_NAME,
        input_dtype="uint8" if pre else "float16" if opts.fp16 else "float32",
        image_size=cfg.vision.image_size,
        hidden_size=cfg.text.hidden_size,
        budgets={},
        preprocess=pre,
    )


def write_vision(
    model: Any, root: Path, tokens: tuple[int, ...], opts: VisionOptions
) -> tuple[VisionSection, list[FileEntry]]:
    """Export and hash the vision graphs into bundle dir `root` (parity: export.gates)."""
    from export.wrap import INPUT_NAME

    section = vision_section(model.cfg, opts)
    size = section.image_size
    entries = []
    for rel, budgets in graph_files(tokens, opts).items():
        names = export_graph(model, budgets, root / rel, opts)
        shapes: dict[str, list[Any]] = {INPUT_NAME: ["batch", 3, size, size]}
        if opts.frame_input:
            frame_input_graph(root / rel, model.cfg, opts)
            shapes = {FRAME_INPUT: ["batch", "height", "width", 3]}
        for t, name in zip(budgets, names):
            section.budgets[str(t)] = VisionOutput(file=rel, output=name)
        shapes.update({n: ["batch", t, section.hidden_size] for t, n in zip(budgets, names)})
        entries.append(
            file_entry(
                root, rel, "vision-onnx", precision=opts.precision, budgets=list(budgets), shapes=shapes
            )
        )
        if (root / (rel + ".data")).is_file():
            entries.append(file_entry(root, rel + ".data", "vision-data", precision=opts.precision))
    if opts.frame_input:
        entries.append(write_preprocess_graph(model.cfg, root, opts))
    return section, entries


def write_preprocess_graph(cfg: Any, root: Path, opts: VisionOptions) -> FileEntry:
    """vision/preprocess.onnx: frames -> pixel_values float32, the vision graphs' own first nodes."""
    import onnx

    from fmvr.preprocess import Preprocessor

    model = frame_only_model(Preprocessor.from_config(cfg), opts.opset)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(root / PREPROCESS_GRAPH))
    size = cfg.vision.image_size
    shapes = {FRAME_INPUT: ["batch", "height", "width", 3], PIXELS_OUTPUT: ["batch", 3, size, size]}
    return file_entry(root, PREPROCESS_GRAPH, "vision-preprocess", precision="fp32", shapes=shapes)
