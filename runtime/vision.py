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

import contextlib
import ctypes
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
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
ORT_TRT_MAX_BATCH = 4  # the ort-tensorrt provider's profile, as export.trt's default --max-batch
TRT_SUPPORTED = (10, 11)  # TensorRT majors [lo, hi): engines and this backend are TensorRT 10
STOP_SPINNING = "session.force_spinning_stop"  # onnxruntime: idle the intra-op pool when a Run ends


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
    providers: list[str]  # what its sessions actually got (onnxruntime's get_providers())
    max_batch: int | None  # the most images one encode call takes (None: the graph's dynamic batch)

    def encode(self, pixels: np.ndarray, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        """pixels [B,3,S,S] float32 (or frames [B,H,W,3] uint8, see graph_input) -> {T: [B, T, D]
        float32} for each requested budget."""
        ...


def allow_fallback() -> bool:
    """FMVR_ALLOW_PROVIDER_FALLBACK=1: run (warning loudly) when a requested GPU provider fell
    back to CPU; otherwise that is refused at load."""
    return os.environ.get("FMVR_ALLOW_PROVIDER_FALLBACK", "").lower() in ("1", "true", "yes")


def check_providers(got: Sequence[str], requested: str, what: str, allow: bool | None = None) -> list[str]:
    """`got` (a session's get_providers()) if it has the requested provider. onnxruntime builds a
    session even when a GPU provider fails to load (missing CUDA/cuDNN/TensorRT libraries), only
    warning, and runs it on CPU: a silent fall back is refused (or, allowed, logged loudly)."""
    got = list(got)
    if requested == "CPUExecutionProvider" or requested in got:
        return got
    msg = (
        f"{what}: asked onnxruntime for {requested}, the session got {got} (the GPU provider failed to "
        "load: check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs, and "
        "`python -c 'import onnxruntime as o; print(o.get_available_providers())'`)"
    )
    if not (allow_fallback() if allow is None else allow):
        raise BundleError(msg + "; set FMVR_ALLOW_PROVIDER_FALLBACK=1 to run on CPU anyway")
    log.warning("PROVIDER FALLBACK (allowed by FMVR_ALLOW_PROVIDER_FALLBACK): %s", msg)
    return got


def ort_trt_options(bundle_dir: Path, m: Manifest) -> dict[str, Any]:
    """onnxruntime's TensorRT provider options. Without them it rebuilds its engines at every
    start and at every new input shape: an engine cache (FMVR_TRT_CACHE, default
    ~/.cache/fmvr/ort-trt/<graph sha>), a timing cache, and one profile over the dynamic axes
    (batch 1..ORT_TRT_MAX_BATCH; frames 1x1 to the bundle's --max-frame), as export.trt builds.
    fp16 on for pixel graphs; off for frame graphs, whose in-graph preprocessing rounds grey
    levels in fp32 (export.trt pins those layers; the provider cannot): FMVR_ORT_TRT_FP16=0/1."""
    s, name, spec = m.vision.image_size, m.vision.input_name, m.vision.preprocess
    first = sorted({o.file for o in m.vision.budgets.values()})[0]
    sha = next((f.sha256 for f in m.files if f.path == first), "")[:16] or "unhashed"
    root = Path(os.environ.get("FMVR_TRT_CACHE") or Path.home() / ".cache" / "fmvr" / "ort-trt")
    cache = root / sha
    cache.mkdir(parents=True, exist_ok=True)
    if spec is None:
        lo, opt, hi = (1, 3, s, s), (1, 3, s, s), (ORT_TRT_MAX_BATCH, 3, s, s)
    else:
        oh, ow = min(720, spec.max_height), min(1280, spec.max_width)
        lo, opt, hi = (1, 1, 1, 3), (1, oh, ow, 3), (ORT_TRT_MAX_BATCH, spec.max_height, spec.max_width, 3)
    fp16 = os.environ.get("FMVR_ORT_TRT_FP16", "0" if spec is not None else "1") == "1"

    def dims(d: tuple[int, ...]) -> str:
        return f"{name}:" + "x".join(map(str, d))

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": str(fp16),
        "trt_max_workspace_size": str(2 << 30),
        "trt_profile_min_shapes": dims(lo),
        "trt_profile_opt_shapes": dims(opt),
        "trt_profile_max_shapes": dims(hi),
    }


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
        # The vision pass is one Run per request and the LLM's prefill follows at once, on the
        # same cores: without this, the vision pool's threads keep spinning after the Run and take
        # cores from the prefill (36-token prefill 97 -> 73 ms, TTFT 128 -> 103 ms, 2 threads).
        opts.add_session_config_entry(STOP_SPINNING, "1")
        providers: list[Any] = [
            self.provider,
            "CPUExecutionProvider",
        ]  # CPU only for ops a GPU provider lacks
        if self.provider == "TensorrtExecutionProvider":
            providers = [
                (self.provider, ort_trt_options(bundle_dir, m)),
                "CUDAExecutionProvider",
                "CPUExecutionProvider",
            ]
            self.max_batch = ORT_TRT_MAX_BATCH  # the provider's profile
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
        sessions = {**self.sessions, **({spec.graph: self.pre_session} if spec and self.pre_session else {})}
        got = [check_providers(s.get_providers(), self.provider, f"vision {f}") for f, s in sessions.items()]
        self.providers = got[0]  # what the sessions actually run on (the first is the one asked for)

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


class _Slot:
    """One in-flight call's TensorRT state for one engine, cached for the next call: execution
    context, stream, device buffers and pinned host buffers (grown to the largest call seen, not
    allocated for the profile's maximum)."""

    def __init__(self, engine: Any, cudart: Any) -> None:
        self.cudart = cudart
        self.ctx = engine.create_execution_context()
        if self.ctx is None:
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        err, self.stream = cudart.cudaStreamCreate()
        _check(err, "cudaStreamCreate")
        self.dev: dict[str, tuple[int, int]] = {}  # role -> (pointer, bytes)
        self.host: dict[str, tuple[int, int, np.ndarray]] = {}  # role -> (pointer, bytes, uint8 view)

    def device(self, role: str, nbytes: int) -> int:
        ptr, size = self.dev.get(role, (0, 0))
        if size < nbytes:
            if ptr:
                self.cudart.cudaFree(ptr)
            err, new = self.cudart.cudaMalloc(nbytes)
            _check(err, "cudaMalloc")
            ptr, size = int(new), nbytes
            self.dev[role] = (ptr, size)
        return ptr

    def pinned(self, role: str, nbytes: int) -> np.ndarray:
        """A uint8 view of page-locked host memory (async copies need it to be truly async)."""
        ptr, size, view = self.host.get(role, (0, 0, np.empty(0, np.uint8)))
        if size < nbytes:
            if ptr:
                self.cudart.cudaFreeHost(ptr)
            err, new = self.cudart.cudaMallocHost(nbytes)
            _check(err, "cudaMallocHost")
            ptr, size = int(new), nbytes
            view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(ptr))
            self.host[role] = (ptr, size, view)
        return view[:nbytes]

    def close(self) -> None:
        for ptr, _ in self.dev.values():
            self.cudart.cudaFree(ptr)
        for ptr, _, _ in self.host.values():
            self.cudart.cudaFreeHost(ptr)
        self.dev, self.host = {}, {}
        self.cudart.cudaStreamDestroy(self.stream)
        self.ctx = None


def _check(err: Any, what: str = "CUDA call") -> None:
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUDA error {int(err)}")


class TrtVision:
    """TensorRT engines, one per budget (plain engine bytes + sidecar), run with cuda-python.
    Serves the budgets that have engines. Each call borrows a cached slot (context, stream,
    buffers) of its engine; at most FMVR_TRT_CONTEXTS (default 2) per engine exist, since a
    context's activation memory is sized for the profile's maximum: on an 8 GB Orin, concurrent
    requests must not each hold one."""

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
        self.providers = [f"TensorRT {trt.__version__}"]
        self.section = m.vision
        self.io = {t: _io_names(trt, e) for t, e in self.engines.items()}  # t -> (input, output)
        self.max_batch: int | None = min((_profile_max_batch(e) for e in self.engines.values()), default=1)
        self.max_slots = max(1, int(os.environ.get("FMVR_TRT_CONTEXTS", "2")))
        self._free: dict[int, queue.LifoQueue[_Slot]] = {t: queue.LifoQueue() for t in self.engines}
        self._made: dict[int, list[_Slot]] = {t: [] for t in self.engines}
        self._lock = threading.Lock()

    def encode(self, pixels: np.ndarray, budgets: Sequence[int]) -> dict[int, np.ndarray]:
        return {t: self._run(t, pixels) for t in budgets}

    @contextlib.contextmanager
    def _slot(self, t: int) -> Iterator[_Slot]:
        try:
            slot = self._free[t].get_nowait()
        except queue.Empty:
            with self._lock:
                make = len(self._made[t]) < self.max_slots
                if make:
                    slot = _Slot(self.engines[t], self.cudart)
                    self._made[t].append(slot)
            if not make:
                slot = self._free[t].get()  # wait for a call to finish with its slot
        try:
            yield slot
        finally:
            self._free[t].put(slot)

    def _run(self, t: int, pixels: np.ndarray) -> np.ndarray:
        trt, cudart = self.trt, self.cudart
        if t not in self.engines:
            raise ValueError(f"no TensorRT engine for budget {t}; engines: {sorted(self.engines)}")
        engine = self.engines[t]
        inp, outn = self.io[t]
        x = graph_input(pixels, self.section)  # [B, 3, S, S] or frames [B, H, W, 3] uint8
        x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(inp)))
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(outn)))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._slot(t) as s:
            # set_input_shape is False for a shape outside the profile: TensorRT would run on garbage
            if not s.ctx.set_input_shape(inp, tuple(x.shape)):
                lo, _, hi = engine.get_tensor_profile_shape(inp, 0)
                raise ValueError(
                    f"input {tuple(x.shape)} is outside engine t{t}'s profile {tuple(lo)}..{tuple(hi)}"
                )
            shape = tuple(s.ctx.get_tensor_shape(outn))  # [B, T, D]
            if any(d < 0 for d in shape):
                raise RuntimeError(f"engine t{t}: output shape {shape} unresolved after set_input_shape")
            ny = int(np.prod(shape)) * out_dtype.itemsize
            dx, dy = s.device("x", x.nbytes), s.device("y", ny)
            hx, hy = s.pinned("x", x.nbytes), s.pinned("y", ny)
            hx[:] = x.reshape(-1).view(np.uint8)
            _check(cudart.cudaMemcpyAsync(dx, hx.ctypes.data, x.nbytes, h2d, s.stream)[0], "cudaMemcpyAsync")
            if not (s.ctx.set_tensor_address(inp, dx) and s.ctx.set_tensor_address(outn, dy)):
                raise RuntimeError(f"engine t{t}: set_tensor_address refused a buffer")
            if not s.ctx.execute_async_v3(int(s.stream)):
                raise RuntimeError(f"TensorRT execution failed for budget {t}")
            _check(cudart.cudaMemcpyAsync(hy.ctypes.data, dy, ny, d2h, s.stream)[0], "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(s.stream)[0], "cudaStreamSynchronize")
            return hy.view(out_dtype).reshape(shape).astype(np.float32)  # a copy: the slot is reused

    def close(self) -> None:
        """Free every cached context, stream and buffer."""
        with self._lock:
            for slots in self._made.values():
                for slot in slots:
                    slot.close()
            self._made = {t: [] for t in self.engines}
            self._free = {t: queue.LifoQueue() for t in self.engines}


def _io_names(trt: Any, engine: Any) -> tuple[str, str]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    return inp, out


def _profile_max_batch(engine: Any) -> int:
    """The largest batch an engine's optimization profile 0 accepts on its input."""
    import tensorrt as trt

    inp, _ = _io_names(trt, engine)
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
    try:
        import tensorrt as trt

        cudart = _cudart()
    except ImportError:
        return None
    if not hasattr(trt, "Builder"):  # only tensorrt-stubs' .pyi folder is importable here
        return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    return str(trt.__version__), f"{props.major}.{props.minor}"


def trt_supported(version: str) -> bool:
    return TRT_SUPPORTED[0] <= int(version.split(".")[0]) < TRT_SUPPORTED[1]


def check_engines(bundle_dir: Path, m: Manifest, device: tuple[str, str]) -> None:
    """BundleError (with the rebuild command) for the first engine not built for this device."""
    for t, e in m.vision.engines.items():
        why = engine_mismatch(e, device[0], device[1], trt_rebuild_command(bundle_dir, int(t), e.precision))
        if why:
            raise BundleError(why)


def engine_budgets(m: Manifest) -> list[int]:
    """The bundle's budgets that have a TensorRT engine, largest first."""
    return [t for t in sorted(m.budgets, reverse=True) if str(t) in m.vision.engines]


def choose_backend(bundle_dir: Path, m: Manifest, requested: str = "auto") -> tuple[str, str]:
    """(backend name, why) from the request, the manifest and the device; errors, never fallbacks."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown vision backend {requested!r}; choose one of {BACKENDS}")
    providers = ort_providers()
    engines = bool(m.vision.engines)
    note = ""
    if requested == "tensorrt" or (requested == "auto" and engines):
        device = trt_device()
        if device is not None and not trt_supported(device[0]):
            note = f"; TensorRT {device[0]} is outside the supported >=10,<11"
            if requested == "tensorrt":
                raise BundleError(
                    f"TensorRT {device[0]} found; the tensorrt backend supports TensorRT >=10,<11 (its engines "
                    "and API): install tensorrt 10.x (JetPack 6), or use --backend ort-cuda"
                )
            device = None
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
            served = engine_budgets(
                m
            )  # a subset of engines serves those budgets; the policy picks among them
            missing = [t for t in m.budgets if t not in served]
            more = (
                f"; no engine for {missing} (build: python -m export.trt --bundle {bundle_dir})"
                if missing
                else ""
            )
            return (
                "tensorrt",
                f"TensorRT {device[0]} engines for compute capability {device[1]}, budgets {served}{more}",
            )
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
        return "ort-cuda", why + note
    why = "no GPU provider in this onnxruntime" + (
        "; engines present but TensorRT is not importable here" if engines else ""
    )
    return "ort-cpu", why + note


def load_backend(bundle_dir: Path, m: Manifest, requested: str = "auto", threads: int = 0) -> VisionBackend:
    name, why = choose_backend(bundle_dir, m, requested)
    backend: VisionBackend = (
        TrtVision(bundle_dir, m) if name == "tensorrt" else OrtVision(bundle_dir, m, name, threads)
    )
    log.info(
        "vision backend: %s (%s); serves budgets %s on %s",
        name,
        why,
        list(backend.budgets),
        backend.providers,
    )
    return backend
