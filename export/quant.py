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


def head_matmul(model: Any) -> str | None:
    """The name of the MatMul that computes the graph's `logits` (the LM head), walking back
    through the shape/cast ops between them; None when there is none."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = "logits"
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node.name
        name = node.input[0]
    return None


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only MatMulNBits quantization (round to nearest per block of `block_size` weights)
    of every MatMul with a constant weight.

    symmetric: zero point fixed at the middle level; else a zero point per block (+~4% bytes).
    eight_bit: MatMuls kept at 8 bits (mixed precision): "head" is the LM head (the MatMul that
    computes `logits`), any other entry a substring of node names (e.g. "down_proj").
    int8_activations: on the CPU, MatMulNBits' accuracy_level 4 (activations int8 per block in
    the kernel); without it onnxruntime dequantizes 8-bit weights on every call (~20x slower)."""

    bits: int
    symmetric: bool = True
    eight_bit: tuple[str, ...] = ()
    int8_activations: bool = True

    def describe(self) -> str:
        zero = "symmetric" if self.symmetric else "asymmetric"
        named = [("the LM head" if k == "head" else k) for k in self.eight_bit]
        keep = f", int8 for {' and '.join(named)}" if self.bits != 8 and self.eight_bit else ""
        act = "activations int8 per block in the kernel" if self.int8_activations else "fp32 activations"
        return f"int{self.bits} weights (round to nearest, {zero} blocks{keep}); on the CPU, {act}"

    def kept(self, model: Any) -> list[str]:
        """The MatMuls `eight_bit` names in `model`."""
        names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        head = head_matmul(model)
        return [
            n
            for n in names
            if any((k == "head" and n == head) or (k != "head" and k in n) for k in self.eight_bit)
        ]

    def __call__(self, model: Any, block_size: int, target: str) -> Any:
        keep = self.kept(model) if self.bits != 8 else []
        if self.eight_bit and self.bits != 8 and not keep:
            raise ExportError(f"--quant: no MatMul matches {self.eight_bit} in this decoder")
        model = self._pass(model, self.bits, block_size, target, exclude=keep)
        if keep:
            model = self._pass(model, 8, block_size, target, include=keep)
        return model

    def _pass(
        self, model: Any, bits: int, block_size: int, target: str,
        exclude: list[str] | None = None, include: list[str] | None = None,
    ) -> Any:  # fmt: skip
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # accuracy_level 4 on the CPU: activations quantized to int8 per block of K inside the
        # kernel, int8 dot products (VNNI / AMX). Without it onnxruntime dequantizes the 8-bit
        # weights on every call: ~1 ms per 576x1536 MatMul at M=1, 50x the level-4 kernel
        # (measured, onnxruntime 1.32), which made the whole int8 decoder a ~240 ms fixed cost.
        level = ACCURACY_LEVEL_CPU if target == "cpu" and self.int8_activations else None
        q = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=self.symmetric, accuracy_level=level,
            nodes_to_exclude=exclude or [], nodes_to_include=include or None,
        )  # fmt: skip
        with quiet_quantizer_logs():
            q.process()
        return q.model.model


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


# The int4 recipe, chosen on benchmarks/int4_quality.py (small, SmolLM2-135M): asymmetric
# blocks and the LM head in 8 bits cut the mean KL to fp32 from 0.45 to 0.26 nats and raise
# teacher-forced top-1 on plain text from 0.56 to 0.75 (questions 0.59 -> 0.78) for 16 MB more;
# no weight-only int4 recipe there reached int8's 0.98 (int8 also keeps the down projections:
# 0.77). Symmetric int4 everywhere is the fastest and the worst.
INT4 = WeightOnly(4, symmetric=False, eight_bit=("head",))
INT8 = WeightOnly(8)

# Floors: measured on the untrained tiny model (near-flat logits, the hardest case); trained
# models agree more. int8 is weight-only: per-tensor dynamic int8 activations lost SmolLM2
# (top-1 agreement 0.54 from its outlier activations); 8-bit weight blocks keep 1.00.
QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization(
            "int4",
            INT4.describe(),
            ("cpu", "cuda"),
            "",
            floor=0.65,
            export_precision="fp32",
            quantize=INT4,
            builder_quantizes_for=("cuda",),
        ),
        Quantization(
            "int8",
            INT8.describe(),
            ("cpu",),
            "8-bit MatMulNBits kernels are onnxruntime CPU kernels",
            floor=0.85,
            export_precision="fp32",
            quantize=INT8,
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
