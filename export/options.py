"""What an export is asked to make, as two small frozen records built once from the command line
(or in Python) and passed down: `VisionOptions` for the vision graphs, `LLMOptions` for the
decoder. The manifest stores both (`build.vision`, `build.llm`) and the rebuild command is
generated from them, never edited as text.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from export.common import ExportError
from export.framegraph import parse_frame_size
from export.quant import QUANTS, TARGETS, Quantization, quantization
from runtime.bundle import LAYOUTS

VISION_PRECISIONS = ("fp32", "fp16")
PREPROCESS = ("graph", "host")  # where preprocessing runs: inside the vision graph, or before it
DEFAULT_MAX_FRAME = (1920, 1920)  # (W, H): the largest frame a frame-input graph declares
EXPORTERS = ("auto", "genai", "dynamo")
EXPORTER_NAMES = {"genai": "onnxruntime-genai", "dynamo": "torch-dynamo"}  # as the manifest records them
GENAI_ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class VisionOptions:
    """The vision graphs: one shared graph or one per budget, fp32 or fp16, ONNX opset, and
    where preprocessing runs: "graph" (uint8 frames up to max_frame (W, H) in, export.framegraph)
    or "host" (pixels in, fmvr.preprocess before the graph)."""

    layout: str = "shared"
    precision: str = "fp32"
    opset: int = 18
    preprocess: str = "graph"
    max_frame: tuple[int, int] = DEFAULT_MAX_FRAME

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ExportError(f"--layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.precision not in VISION_PRECISIONS:
            raise ExportError(f"vision precision {self.precision!r}: choose one of {VISION_PRECISIONS}")
        if self.opset < 17:
            raise ExportError(f"--opset {self.opset}: the vision graphs need opset 17 or newer")
        if self.preprocess not in PREPROCESS:
            raise ExportError(f"--preprocess {self.preprocess!r}: choose one of {', '.join(PREPROCESS)}")
        try:
            object.__setattr__(self, "max_frame", parse_frame_size(self.max_frame))
        except ValueError as e:
            raise ExportError(f"--max-frame: {e}") from None

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def frame_input(self) -> bool:
        return self.preprocess == "graph"

    def flags(self) -> list[str]:
        """The `python -m export` flags that ask for these options."""
        flags = ["--layout", self.layout, *(["--fp16"] if self.fp16 else []), "--opset", str(self.opset)]
        flags += ["--preprocess", self.preprocess]
        if self.frame_input:
            flags += ["--max-frame", "x".join(map(str, self.max_frame))]
        return flags

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LLMOptions:
    """The decoder: quantization (a row of export.quant), target device, exporter, block size."""

    quant: str = "int8"
    target: str = "cpu"
    exporter: str = "auto"
    block_size: int = 32
    kv_cache_mb: float | None = None  # the KV memory budget (None: one request at the full context)

    def __post_init__(self) -> None:
        self.quantization.check_target(self.target)
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ExportError(f"--kv-cache-mb {self.kv_cache_mb:g}: give a positive number of MB")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"--exporter {self.exporter!r}: choose one of {', '.join(EXPORTERS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"--block-size {self.block_size}: use a power of two >= 16 (e.g. 32, 64, 128)")

    @property
    def quantization(self) -> Quantization:
        return quantization(self.quant)

    def exporter_for(self, arch: str) -> str:
        """genai or dynamo for this architecture (auto: genai where its builder supports it)."""
        if self.exporter == "genai" and arch not in GENAI_ARCHS:
            raise ExportError(
                f"--exporter genai does not support arch {arch!r} ({', '.join(GENAI_ARCHS)}); "
                "use --exporter dynamo"
            )
        if self.exporter == "auto":
            return "genai" if arch in GENAI_ARCHS else "dynamo"
        return self.exporter

    def flags(self) -> list[str]:
        return [
            *("--quant", self.quant, "--target", self.target),
            *("--exporter", self.exporter, "--block-size", str(self.block_size)),
            *(() if self.kv_cache_mb is None else ("--kv-cache-mb", f"{self.kv_cache_mb:g}")),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_VISION = VisionOptions()
DEFAULT_LLM = LLMOptions()


def rebuild_command(
    source: Sequence[str], out: Any, tokens: Sequence[int], vision: VisionOptions, llm: LLMOptions | None
) -> str:
    """The `python -m export` command line that makes this bundle again (--force included)."""
    argv = [*source, "--out", str(out), "--tokens", ",".join(map(str, tokens)), *vision.flags()]
    argv += [*(llm.flags() if llm else ["--quant", "none"]), "--force"]
    return "python -m export " + shlex.join(argv)


def build_record(
    source: Sequence[str], out: Any, tokens: Sequence[int], vision: VisionOptions, llm: LLMOptions | None
) -> dict[str, Any]:
    """The manifest's `build` section: the options and the command generated from them."""
    return {
        "command": rebuild_command(source, out, tokens, vision, llm),
        "checkpoint": shlex.join(source),
        "vision": vision.to_dict(),
        "llm": llm.to_dict() if llm else None,
    }


def options_from_build(build: dict[str, Any]) -> tuple[VisionOptions, LLMOptions | None]:
    """The options a manifest's `build` section records."""
    llm = build.get("llm")
    vision = {"preprocess": "host", **build["vision"]}  # recorded before frame input existed: host
    return VisionOptions(**vision), LLMOptions(**llm) if llm else None


__all__ = ["EXPORTERS", "PREPROCESS", "QUANTS", "TARGETS", "LLMOptions", "VisionOptions", "rebuild_command"]
