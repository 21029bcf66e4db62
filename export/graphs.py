"""Vision export: tower + projector + pyramid -> ONNX, per budget or one shared graph.

Each graph: pixel_values [batch, 3, S, S] -> tokens_<T> [batch, T, D] (dynamic batch),
torch.onnx.export(dynamo=True), then onnx.checker. The parity gate (export.gates) runs the
written bundle through runtime.vision and compares it with PyTorch.

A library: `python -m export.onnx` (export/onnx.py -> export.cli -> export.build) calls it;
it calls nothing back.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from export.options import VisionOptions
from runtime.bundle import FileEntry, VisionOutput, VisionSection, file_entry

EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit, with margin


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


def write_vision(
    model: Any, root: Path, tokens: tuple[int, ...], opts: VisionOptions
) -> tuple[VisionSection, list[FileEntry]]:
    """Export and hash the vision graphs into bundle dir `root` (parity: export.gates)."""
    from export.wrap import INPUT_NAME

    section = VisionSection(
        layout=opts.layout,
        input_name=INPUT_NAME,
        input_dtype="float16" if opts.fp16 else "float32",
        image_size=model.cfg.vision.image_size,
        hidden_size=model.cfg.text.hidden_size,
        budgets={},
    )
    entries = []
    for rel, budgets in graph_files(tokens, opts).items():
        names = export_graph(model, budgets, root / rel, opts)
        for t, name in zip(budgets, names):
            section.budgets[str(t)] = VisionOutput(file=rel, output=name)
        shapes: dict[str, list[Any]] = {INPUT_NAME: ["batch", 3, section.image_size, section.image_size]}
        shapes.update({n: ["batch", t, section.hidden_size] for t, n in zip(budgets, names)})
        entries.append(
            file_entry(
                root, rel, "vision-onnx", precision=opts.precision, budgets=list(budgets), shapes=shapes
            )
        )
        if (root / (rel + ".data")).is_file():
            entries.append(file_entry(root, rel + ".data", "vision-data", precision=opts.precision))
    return section, entries
