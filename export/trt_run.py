"""Run a built TensorRT engine (device memory via PyTorch CUDA tensors): parity vs onnxruntime, latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from export.common import compare, parity_images, pixels_for
from runtime.bundle import Manifest

LATENCY_RUNS = 50


class EngineRunner:
    """One engine + execution context; `__call__(pixels [B,3,S,S]) -> {output: [B,T,D]}`."""

    def __init__(self, engine_bytes: bytes) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        half = trt.DataType.HALF
        self.dtypes = {
            n: torch.float16 if self.engine.get_tensor_dtype(n) == half else torch.float32 for n in names
        }

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        name = self.inputs[0]
        x = torch.from_numpy(pixels).to("cuda", self.dtypes[name]).contiguous()  # [B, 3, S, S]
        self.context.set_input_shape(name, list(x.shape))
        self.context.set_tensor_address(name, int(x.data_ptr()))
        outs = {}
        for out in self.outputs:
            dims = self.context.get_tensor_shape(out)
            shape = [int(dims[i]) for i in range(len(dims))]  # [B, T, D]
            outs[out] = torch.empty(shape, dtype=self.dtypes[out], device="cuda")
            self.context.set_tensor_address(out, int(outs[out].data_ptr()))
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 returned False")
        stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}


def ort_outputs(onnx_path: Path, pixels: np.ndarray, input_name: str, fp16: bool) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = sess.run(names, {input_name: pixels.astype(np.float16 if fp16 else np.float32)})
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, res)}


def latency_ms(run: Any, pixels: np.ndarray, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """Median/p90 wall time of one call: host->device copy, execute, device->host copy."""
    for _ in range(5):
        run(pixels)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(pixels)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)), "runs": runs,
            "batch": int(pixels.shape[0])}  # fmt: skip


def engine_parity(engine: bytes, onnx_path: Path, m: Manifest, tokens: int, opts: Any) -> dict[str, Any]:
    """{"parity": max abs/cosine vs onnxruntime CPU on real images, "latency_ms": at the opt batch}."""
    from fmvr.config import FMVRConfig

    cfg = FMVRConfig.from_dict(m.model["config"])
    images, names = parity_images()
    pixels = pixels_for(cfg, images)[: opts.max_batch]  # [N, 3, S, S], N within the profile
    runner = EngineRunner(engine)
    out_name = m.vision.output_for(tokens).output
    got = runner(pixels)[out_name]
    ref = ort_outputs(onnx_path, pixels, m.vision.input_name, m.vision.input_dtype == "float16")[out_name]
    stats = compare(ref, got)
    batch = np.repeat(pixels[:1], opts.opt_batch, axis=0)  # [opt, 3, S, S]
    return {"parity": {**stats, "images": names[: len(pixels)], "reference": "onnxruntime CPU (same ONNX)"},
            "latency_ms": latency_ms(runner, batch)}  # fmt: skip
