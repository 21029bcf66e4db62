"""The decoder quantizations, described once: one row per `--quant` value.

Each row says what the quantization is (the manifest's descriptive method), where it runs
(the targets whose onnxruntime provider has its kernels), the quality floor its export gate
must reach, the precision the exporter writes before quantizing, and the quantize step.
`--quant`, `LLMOptions.quant` and the manifest's `llm.quant` all take these names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from export.common import ExportError

TARGETS = ("cpu", "cuda")


@contextmanager
def quiet_quantizer_logs() -> Iterator[None]:
    """onnxruntime's quantizers call logging.basicConfig(INFO), then log every node: keep the
    root logger as it was and drop their messages."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        root.setLevel(level)
        root.handlers[:] = handlers


ACCURACY_LEVEL_CPU = 4  # MatMulNBits accuracy_level on the CPU target (recorded in the manifest)


def matmul_nbits(bits: int) -> Callable[[Any, int, str], Any]:
    """Weight-only MatMulNBits with symmetric blocks: onnx ModelProto in, quantized ModelProto out."""

    def quantize(model: Any, block_size: int, target: str) -> Any:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # accuracy_level 4 on the CPU: activations quantized to int8 per block of K inside the
        # kernel, int8 dot products (VNNI / AMX). Without it onnxruntime dequantizes the 8-bit
        # weights on every call: ~1 ms per 576x1536 MatMul at M=1, 50x the level-4 kernel
        # (measured, onnxruntime 1.32), which made the whole int8 decoder a ~240 ms fixed cost.
        level = ACCURACY_LEVEL_CPU if target == "cpu" else None
        q = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=level
        )
        with quiet_quantizer_logs():
            q.process()
        return q.model.model

    return quantize


@dataclass(frozen=True)
class Quantization:
    name: str  # the --quant value
    method: str  # what it is, in words (manifest llm.quantization.method)
    targets: tuple[str, ...]  # targets whose provider has its kernels
    why_targets: str  # why only those (shown when another target is asked for)
    floor: float  # teacher-forced top-1 agreement with PyTorch fp32 the export gate requires
    export_precision: str  # what the exporter writes before `quantize`: fp32 | fp16
    quantize: Callable[[Any, int, str], Any] | None = None  # (ModelProto, block_size, target) -> ModelProto
    # targets where onnxruntime-genai's builder quantizes by itself (fp16 activations, MatMulNBits)
    builder_quantizes_for: tuple[str, ...] = ()

    @property
    def uses_block_size(self) -> bool:
        return self.quantize is not None

    def check_target(self, target: str) -> None:
        if target not in TARGETS:
            raise ExportError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
        if target not in self.targets:
            others = [q.name for q in QUANTIZATIONS.values() if target in q.targets]
            raise ExportError(
                f"--quant {self.name} needs --target {' or '.join(self.targets)} ({self.why_targets}); "
                f"for --target {target} use {', '.join(others[:-1])} or {others[-1]}"
            )

    def builder_precision(self, target: str) -> str:
        """The precision to ask onnxruntime-genai's builder for."""
        return self.name if target in self.builder_quantizes_for else self.export_precision

    def needs_quantize_step(self, exporter: str, target: str) -> bool:
        """Whether we quantize after export (not when the genai builder already did)."""
        built = exporter == "genai" and target in self.builder_quantizes_for
        return self.quantize is not None and not built


# Floors: measured on the untrained tiny model (near-flat logits, the hardest case); trained
# models agree more. int8 is weight-only: per-tensor dynamic int8 activations lost SmolLM2
# (top-1 agreement 0.54 from its outlier activations); 8-bit weight blocks keep 1.00.
QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization(
            "int4",
            "int4 weights (MatMulNBits, symmetric blocks); on the CPU, activations int8 per block in the kernel",
            ("cpu", "cuda"),
            "",
            floor=0.65,
            export_precision="fp32",
            quantize=matmul_nbits(4),
            builder_quantizes_for=("cuda",),
        ),
        Quantization(
            "int8",
            "int8 weights (MatMulNBits, symmetric blocks); on the CPU, activations int8 per block in the kernel",
            ("cpu",),
            "8-bit MatMulNBits kernels are onnxruntime CPU kernels",
            floor=0.85,
            export_precision="fp32",
            quantize=matmul_nbits(8),
        ),
        Quantization(
            "fp16",
            "fp16 weights and activations",
            ("cuda",),
            "onnxruntime's CPU provider lacks fp16 kernels",
            floor=0.95,
            export_precision="fp16",
        ),
        Quantization(
            "fp32",
            "fp32 weights and activations (no quantization)",
            ("cpu", "cuda"),
            "",
            floor=0.999,
            export_precision="fp32",
        ),
    )
}
QUANTS = tuple(QUANTIZATIONS)  # the --quant values


def quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise ExportError(f"--quant {name!r}: choose one of {', '.join(QUANTS)}")
    return QUANTIZATIONS[name]
