"""Vision backends behind one small protocol: the graph's input -> {T: visual tokens [B,T,D]}.

The input is pixels [B,3,S,S] float (fmvr.preprocess on the host), or for a bundle whose
manifest has vision.preprocess, uint8 RGB frames [B,H,W,3] at their own size that the graph
pads, resizes and normalises itself (runtime.frame_input checks them first).

- OrtVision: onnxruntime with the CPU, CUDA or TensorRT execution provider, over the
  bundle's shared graph (one pass, every budget an output) or per-budget graphs.
- TrtVision: native TensorRT engines (tensorrt + cuda-python, imported only in here),
  one engine per budget, checked against this device's TensorRT version and GPU.

`choose_backend` picks one from the manifest and the device and says why; asking for a
backend that cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.bundle import BundleError, Manifest, VisionSection, engine_mismatch, trt_rebuild_command
from runtime.frame_input import check_frames

log = logging.getLogger("runtime")

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


def graph_input(x: Any, section: VisionSection) -> np.ndarray:
    """`x` checked and laid out as the bundle's graphs take it: frames (uint8, refused otherwise)
    or pixels (any float, cast to the graph's dtype)."""
    if section.preprocess is not None:
        return check_frames(x, section.preprocess)  # [B, H, W, 3] uint8
    return np.ascontiguousarray(x, dtype=NP_DTYPES[section.input_dtype])  # [B, 3, S, S]


class VisionBackend(Protocol):
    name: str  # ort-cpu | ort-cuda | ort-tensorrt | tensorrt
    provider: str  # the execution provider / engine runtime that does the work
    shared: bool  # one pass serves every budget (escalation without a second tower run)
    budgets: tuple[int, ...]  # the budgets this backend serves, largest first
    max_batch: int | None  # the most images one encode call takes (None: the graph's dynamic batch)

    def encode(self, pixels: np.ndarray, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        """pixels [B,3,S,S] float32 (or frames [B,H,W,3] uint8, see graph_input) -> {T: [B, T, D]
        float32} for each requested budget."""
        ...


class OrtVision:
    max_batch: int | None = None  # the exported graphs' batch axis is dynamic

    def __init__(self, bundle_dir: Path, m: Manifest, name: str, threads: int = 0) -> None:
        import onnxruntime as ort

        self.name, self.provider = name, ORT_PROVIDERS[name]
        self.shared = m.vision.layout == "shared"
        self.section = m.vision
        self.input_name = m.vision.input_name
        self.outputs = {int(t): o for t, o in m.vision.budgets.items()}
        self.budgets = tuple(sorted(self.outputs, reverse=True))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = [self.provider, "CPUExecutionProvider"]  # CPU only for ops a GPU provider lacks
        if self.provider == "TensorrtExecutionProvider":
            providers.insert(1, "CUDAExecutionProvider")
        if self.provider == "CPUExecutionProvider":
            providers = [self.provider]
        self.sessions = {
            f: ort.InferenceSession(str(bundle_dir / f), sess_options=opts, providers=providers)
            for f in sorted({o.file for o in self.outputs.values()})
        }
        spec = m.vision.preprocess
        self.pre_session = (
            ort.InferenceSession(str(bundle_dir / spec.graph), sess_options=opts, providers=providers)
            if spec is not None and spec.graph
            else None
        )

    def encode(self, pixels: np.ndarray, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        by_file: dict[str, list[int]] = {}
        for t in budgets:
            if t not in self.outputs:
                raise ValueError(f"budget {t} not in this bundle's {sorted(self.outputs, reverse=True)}")
            by_file.setdefault(self.outputs[t].file, []).append(t)
        x = graph_input(pixels, self.section)  # [B, 3, S, S] or frames [B, H, W, 3]
        out: dict[int, np.ndarray] = {}
        for f, ts in by_file.items():  # shared layout: one file, one pass
            res = self.sessions[f].run([self.outputs[t].output for t in ts], {self.input_name: x})
            out.update({t: np.asarray(r, dtype=np.float32) for t, r in zip(ts, res)})  # [B, T, D]
        return out

    def pixels(self, frames: np.ndarray) -> np.ndarray:
        """The in-graph preprocessing of `frames` alone (the bundle's vision.preprocess.graph):
        float32 [B, 3, S, S]."""
        spec = self.section.preprocess
        if spec is None or self.pre_session is None:
            raise BundleError("this bundle's vision graphs take pixels: there is no in-graph preprocessing")
        x = graph_input(frames, self.section)  # [B, H, W, 3]
        return np.asarray(self.pre_session.run([spec.pixels_output], {self.input_name: x})[0], np.float32)


class TrtVision:
    """TensorRT engines, one per budget (plain engine bytes + sidecar), run with cuda-python."""

    name = "tensorrt"
    provider = "TensorRT"
    shared = False

    def __init__(self, bundle_dir: Path, m: Manifest, budgets: Sequence[int] | None = None) -> None:
        """Deserialize the manifest's engines (only those of `budgets` when given)."""
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        rt = trt.Runtime(self.logger)
        self.engines: dict[int, Any] = {}
        wanted = {str(t) for t in budgets} if budgets is not None else set(m.vision.engines)
        for t, e in m.vision.engines.items():
            if t not in wanted:
                continue
            data = (bundle_dir / e.file).read_bytes()
            engine = rt.deserialize_cuda_engine(data)
            if engine is None:
                raise BundleError(
                    f"TensorRT could not load {e.file}; rebuild it: {trt_rebuild_command(bundle_dir, int(t), e.precision)}"
                )
            self.engines[int(t)] = engine
        self.budgets = tuple(sorted(self.engines, reverse=True))
        self.section = m.vision
        self.max_batch: int | None = min((_profile_max_batch(e) for e in self.engines.values()), default=1)

    def _check(self, err: Any) -> None:
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")

    def encode(self, pixels: np.ndarray, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        return {t: self._run(t, pixels) for t in budgets}

    def _run(self, t: int, pixels: np.ndarray) -> np.ndarray:
        trt, cudart = self.trt, self.cudart
        if t not in self.engines:
            raise ValueError(f"no TensorRT engine for budget {t}; engines: {sorted(self.engines)}")
        engine = self.engines[t]
        ctx = engine.create_execution_context()  # per call: concurrent requests never share one
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outn = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        x = graph_input(pixels, self.section)  # [B, 3, S, S] or frames [B, H, W, 3] uint8
        x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(inp)))
        ctx.set_input_shape(inp, tuple(x.shape))
        shape = tuple(ctx.get_tensor_shape(outn))  # [B, T, D]
        y = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(outn)))
        err, stream = cudart.cudaStreamCreate()
        self._check(err)
        err, dx = cudart.cudaMalloc(x.nbytes)
        self._check(err)
        err, dy = cudart.cudaMalloc(y.nbytes)
        self._check(err)
        try:
            h2d, d2h = (
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            )
            self._check(cudart.cudaMemcpyAsync(dx, x.ctypes.data, x.nbytes, h2d, stream)[0])
            ctx.set_tensor_address(inp, int(dx))
            ctx.set_tensor_address(outn, int(dy))
            if not ctx.execute_async_v3(int(stream)):
                raise RuntimeError(f"TensorRT execution failed for budget {t}")
            self._check(cudart.cudaMemcpyAsync(y.ctypes.data, dy, y.nbytes, d2h, stream)[0])
            self._check(cudart.cudaStreamSynchronize(stream)[0])
        finally:
            cudart.cudaFree(dx)
            cudart.cudaFree(dy)
            cudart.cudaStreamDestroy(stream)
        return y.astype(np.float32)


def _profile_max_batch(engine: Any) -> int:
    """The largest batch an engine's optimization profile 0 accepts on its input."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    return int(engine.get_tensor_profile_shape(inp, 0)[2][0])  # (min, opt, max) shapes -> max B


def _cudart() -> Any:
    """cuda-python's runtime API: `cuda.bindings.runtime` (>= 12.6) or `cuda.cudart` (older)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]
    return runtime


# ---- choosing -------------------------------------------------------------------------------------


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def trt_device() -> tuple[str, str] | None:
    """(TensorRT version, GPU compute capability) when both are usable here, else None."""
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        return None
    import tensorrt as trt

    if not hasattr(trt, "Builder"):  # only tensorrt-stubs' .pyi folder is importable here
        return None
    err, props = _cudart().cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    return str(trt.__version__), f"{props.major}.{props.minor}"


def check_engines(bundle_dir: Path, m: Manifest, device: tuple[str, str]) -> None:
    """BundleError (with the rebuild command) for the first engine not built for this device."""
    for t, e in m.vision.engines.items():
        why = engine_mismatch(e, device[0], device[1], trt_rebuild_command(bundle_dir, int(t), e.precision))
        if why:
            raise BundleError(why)


def choose_backend(bundle_dir: Path, m: Manifest, requested: str = "auto") -> tuple[str, str]:
    """(backend name, why) from the request, the manifest and the device; errors, never fallbacks."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown vision backend {requested!r}; choose one of {BACKENDS}")
    providers = ort_providers()
    engines = bool(m.vision.engines)
    if requested == "tensorrt" or (requested == "auto" and engines):
        device = trt_device()
        if device is None:
            if requested == "tensorrt":
                raise BundleError(
                    "vision backend 'tensorrt' needs the tensorrt and cuda-python packages and an NVIDIA GPU "
                    "(on Jetson they come with JetPack); use --backend ort-cpu or ort-cuda instead"
                )
        else:
            if not engines:
                raise BundleError(
                    f"bundle {bundle_dir} has no TensorRT engines; build them: "
                    f"{trt_rebuild_command(bundle_dir, m.budgets[0], 'fp16')}"
                )
            check_engines(bundle_dir, m, device)
            missing = [t for t in m.budgets if str(t) not in m.vision.engines]
            if missing:
                raise BundleError(
                    f"TensorRT engines missing for budgets {missing}: build them with "
                    f"{trt_rebuild_command(bundle_dir, missing[0], 'fp16')}"
                )
            return "tensorrt", f"TensorRT {device[0]} engines for compute capability {device[1]}"
    if requested.startswith("ort-"):
        if ORT_PROVIDERS[requested] not in providers:
            raise BundleError(
                f"vision backend {requested!r} needs onnxruntime's {ORT_PROVIDERS[requested]}, "
                f"this onnxruntime has {providers} (install onnxruntime-gpu for CUDA/TensorRT)"
            )
        return requested, f"requested; {ORT_PROVIDERS[requested]} available"
    if "CUDAExecutionProvider" in providers:
        why = "CUDA provider available" + (
            "; engines present but TensorRT is not importable" if engines else ""
        )
        return "ort-cuda", why
    why = "no GPU provider in this onnxruntime" + (
        "; engines present but TensorRT is not importable here" if engines else ""
    )
    return "ort-cpu", why


def load_backend(bundle_dir: Path, m: Manifest, requested: str = "auto", threads: int = 0) -> VisionBackend:
    name, why = choose_backend(bundle_dir, m, requested)
    log.info("vision backend: %s (%s)", name, why)
    if name == "tensorrt":
        return TrtVision(bundle_dir, m)
    return OrtVision(bundle_dir, m, name, threads)
