"""TensorRT engines for the vision graphs, built on the device that will run them.

From the bundle's ONNX: TensorRT 10 Python API, explicit-batch network, OnnxParser (failing
nodes listed, exit non-zero), one optimization profile over the batch (and, for a frame-input
graph, over the frame's height and width up to the bundle's --max-frame, its preprocessing
layers kept in fp32), precision flags, INT8
entropy calibration over a folder of images, a persistent timing cache. Each engine is gated
(export.gates.engine_gate: runtime.vision.TrtVision vs the runtime's onnxruntime backend)
before it replaces anything; then the plain serialized engine (no header) and a sidecar JSON
(TensorRT version, GPU, compute capability, precision, profile, sha256, parity, latency) are
listed in the manifest, one engine per budget. tensorrt is imported lazily.

A library: `python -m export.trt` (export/trt.py -> export.cli) calls it; it calls nothing back.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorrt as trt_types

from export import gates, trt_rules
from export.common import ExportError, parse_tokens
from export.engine_inputs import (  # calibration_files/_batches, make_calibrator: also used as et.*
    calibration_batches,
    calibration_files,
    calibration_input,
    calibration_profile,
    frame_profile,
    keep_preprocessing_fp32,
    make_calibrator,
    profile_record,
)
from fmvr.atomic import update_dir, write_bytes, write_json
from runtime.bundle import EngineEntry, GraphPreprocess, Manifest, file_entry, verify_bundle, write_manifest

INSTALL_HELP = (
    "TensorRT is not installed in this Python environment. On Jetson it ships with JetPack "
    "(`sudo apt install nvidia-jetpack`, then use the system python3 or a venv made with "
    "--system-site-packages); on x86 with an NVIDIA GPU: `pip install tensorrt` (wheels come from "
    "NVIDIA's index, https://pypi.nvidia.com). Engines are tied to the TensorRT version and GPU: build "
    "them on the device that runs them. The ONNX bundle runs anywhere with onnxruntime meanwhile."
)
# TensorRT 10 only: 11 removes BuilderFlag.FP16/INT8, the calibrators and set_calibration_profile (weakly
# typed precision flags give way to strongly typed networks). The `trt` extra pins the same range.
TRT_SUPPORTED = (10, 11)  # [lo, hi) major versions
CUDA_PYTHON_SUPPORTED = (12, 13)  # cuda-python 13 needs a CUDA 13 driver; JetPack 6 has CUDA 12
OOM_MARKERS = ("out of memory", "outofmemory", "insufficient memory", "cudaerrormemoryallocation", "oom")


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # fp32 | fp16 | int8 (int8 keeps fp16 for layers without int8 kernels)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    workspace_gb: float = 2.0
    timing_cache: str | None = None
    calib_images: str | None = None
    calib_batch: int = 8
    opt_frame: tuple[int, int] | None = None  # (W, H) for frame-input graphs; None: DEFAULT_OPT_FRAME


# ---- pure logic (unit-tested without TensorRT) -----------------------------------------------------


def check_options(opts: BuildOptions) -> None:
    """What can be refused before TensorRT or the GPU is touched."""
    profile_shapes(opts, 1)
    if opts.precision == "int8":
        calibration_files(opts.calib_images)


def precision_of(fp16: bool, int8: bool) -> str:
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def builder_flags(precision: str) -> list[str]:
    """Names of trt.BuilderFlag to set; fp32 also clears TF32 so it is true fp32."""
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]


def profile_shapes(opts: BuildOptions, size: int) -> dict[str, tuple[int, int, int, int]]:
    """The optimization profile of pixel_values: {min, opt, max} -> (B, 3, S, S)."""
    if not 1 <= opts.min_batch <= opts.opt_batch <= opts.max_batch:
        raise ExportError(
            f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch; "
            f"got {opts.min_batch}, {opts.opt_batch}, {opts.max_batch}"
        )
    return {
        k: (b, 3, size, size)
        for k, b in (("min", opts.min_batch), ("opt", opts.opt_batch), ("max", opts.max_batch))
    }


def input_profile(
    opts: BuildOptions, size: int, frames: GraphPreprocess | None
) -> dict[str, tuple[int, int, int, int]]:
    """The graph input's profile: pixels (B, 3, S, S), or frames (B, H, W, 3) up to the bundle's maximum."""
    shapes = profile_shapes(opts, size)
    return shapes if frames is None else frame_profile(shapes, opts.opt_frame, frames)


def engine_paths(tokens: int, precision: str) -> tuple[str, str]:
    engine = f"vision/t{tokens}.{precision}.engine"
    return engine, engine + ".json"


def parser_errors(parser: Any) -> list[str]:
    """One line per ONNX parser error, naming the failing node and operator."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        lines.append(f"node #{err.node()} {err.node_name()!r} ({err.node_operator()}): {err.desc()}")
    return lines


def build_failure(messages: list[str], opts: BuildOptions) -> ExportError:
    """Why build_serialized_network returned nothing, and which knob to turn."""
    text = "\n  ".join(messages[-8:]) or "(TensorRT logged no error)"
    if any(m in msg.lower() for msg in messages for m in OOM_MARKERS):
        return ExportError(
            f"TensorRT ran out of GPU memory while building. Lower --max-batch (now {opts.max_batch}) "
            f"or --workspace-gb (now {opts.workspace_gb}), close other GPU processes, or build --fp16.\n  {text}"
        )
    return ExportError(f"TensorRT failed to build the engine:\n  {text}")


def sidecar(
    opts: BuildOptions,
    trt_version: str,
    gpu: tuple[str, str],
    engine_sha: str,
    onnx_rel: str,
    onnx_sha: str,
    profile: dict[str, int] | None = None,
) -> dict[str, Any]:
    batches = {"min_batch": opts.min_batch, "opt_batch": opts.opt_batch, "max_batch": opts.max_batch}
    return {
        "trt_version": trt_version,
        "gpu_name": gpu[0],
        "compute_capability": gpu[1],
        "precision": opts.precision,
        "profile": profile or batches,
        "workspace_gb": opts.workspace_gb,
        "engine_sha256": engine_sha,
        "onnx": onnx_rel,
        "onnx_sha256": onnx_sha,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def supported_ops() -> dict[str, Any]:
    """TensorRT's ONNX operator list (export/data/trt_onnx_ops.json, source noted inside)."""
    data: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "trt_onnx_ops.json").read_text())
    return data


def unsupported_ops(onnx_path: Path) -> list[str]:
    """Op types of a graph missing from TensorRT's list (custom domains count as missing)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ok = set(supported_ops()["supported"])
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.node}
    return sorted(f"{d}::{op}" if d != "ai.onnx" else op for d, op in ops if d != "ai.onnx" or op not in ok)


# ---- TensorRT and CUDA ---------------------------------------------------------------------------------


def require_tensorrt(importer: Callable[[str], ModuleType] = importlib.import_module) -> ModuleType:
    try:
        trt = importer("tensorrt")
    except ImportError as e:
        raise ExportError(f"{INSTALL_HELP} ({e})") from None
    if not hasattr(trt, "Builder"):  # tensorrt-stubs leaves a bare `tensorrt/` folder of .pyi files
        where = ", ".join(map(str, getattr(trt, "__path__", []))) or str(getattr(trt, "__file__", "?"))
        raise ExportError(f"{INSTALL_HELP} (the `tensorrt` importable here, {where}, holds only type stubs)")
    major = int(str(trt.__version__).split(".")[0])
    if not TRT_SUPPORTED[0] <= major < TRT_SUPPORTED[1]:
        raise ExportError(
            f"TensorRT {trt.__version__} found; this exporter supports TensorRT >=10,<11 (the API it is "
            "written against: TensorRT 11 drops BuilderFlag.FP16/INT8 and the INT8 calibrators). "
            "On x86: pip install 'tensorrt>=10,<11' (or '.[trt]'); on Jetson, JetPack 6 ships 10.x"
        )
    return trt


def require_gpu(cudart: Any = None) -> tuple[str, str]:
    """(GPU name, compute capability 'M.m') of CUDA device 0, or an ExportError. Through
    cuda-python, not torch: a runtime-only Jetson has no torch (JetPack's is a special wheel)."""
    if cudart is None:
        if importlib.util.find_spec("cuda") is None:
            raise ExportError(
                "cuda-python is not installed: the build queries the GPU and the engine gate runs "
                "(runtime.vision.TrtVision) with it: pip install 'cuda-python>=12,<13' (or '.[trt]')"
            )
        check_cuda_python()
        from runtime.vision import _cudart

        cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise ExportError(
            f"no CUDA GPU visible (cudaGetDeviceCount: error {int(err)}, {count if int(err) == 0 else 0} "
            "devices): TensorRT engines are built on the GPU that runs them. Check nvidia-smi (tegrastats "
            "on Jetson) and that cuda-python's major version matches the driver's CUDA (12 on JetPack 6)"
        )
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise ExportError(f"cudaGetDeviceProperties(0) failed: error {int(err)}")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


def check_cuda_python(version: str | None = None) -> None:
    """ExportError unless cuda-python's major version is in CUDA_PYTHON_SUPPORTED."""
    from importlib import metadata

    if version is None:
        try:
            version = metadata.version("cuda-python")
        except metadata.PackageNotFoundError:
            return  # cuda-bindings alone, or JetPack's own build: let the device query speak
    major = int(version.split(".")[0])
    if not CUDA_PYTHON_SUPPORTED[0] <= major < CUDA_PYTHON_SUPPORTED[1]:
        raise ExportError(
            f"cuda-python {version} found; supported: >=12,<13 (cuda-python 13 needs a CUDA 13 driver, "
            "JetPack 6 has CUDA 12): pip install 'cuda-python>=12,<13'"
        )


def make_logger() -> Any:
    """A trt.ILogger that keeps warnings and errors (for failure messages) and prints errors."""
    import tensorrt as trt

    class CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(msg)
            if severity <= trt.ILogger.Severity.ERROR:
                print(f"[tensorrt] {msg}")

    return CaptureLogger()


def build_engine(
    onnx_path: Path,
    input_name: str,
    opts: BuildOptions,
    size: int,
    calib: Any,
    frames: GraphPreprocess | None = None,
) -> bytes:
    """Parse, configure, build: the serialized engine bytes (raises ExportError with the reason).
    `frames`: the bundle's vision.preprocess when the graph takes frames (profile over H and W)."""
    import tensorrt as trt

    logger = make_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(
            f"TensorRT could not parse {onnx_path.name}:\n  " + "\n  ".join(parser_errors(parser))
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    for flag in builder_flags(opts.precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if opts.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif frames is not None:
        keep_preprocessing_fp32(network, config)
    shapes = input_profile(opts, size, frames)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name,
        trt.Dims(list(shapes["min"])),
        trt.Dims(list(shapes["opt"])),
        trt.Dims(list(shapes["max"])),
    )
    config.add_optimization_profile(profile)
    if calib is not None:
        config.int8_calibrator = calib
        config.set_calibration_profile(
            calibration_profile(builder, input_name, opts.calib_batch, size, frames, profile)
        )
    cache = load_timing_cache(config, opts.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise build_failure(logger.messages, opts)
    if opts.timing_cache:
        write_bytes(opts.timing_cache, bytes(cache.serialize()))
    return bytes(serialized)


def load_timing_cache(config: trt_types.IBuilderConfig, path: str | None) -> trt_types.ITimingCache:
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


# ---- the command ---------------------------------------------------------------------------------------


def single_budget_graph(bundle: Path, m: Manifest, tokens: int, work: Path) -> tuple[Path, str]:
    """The ONNX serving `tokens` alone: the per-budget file, or the shared graph pruned to one output."""
    out = m.vision.output_for(tokens)
    src = bundle / out.file
    if m.vision.layout == "per-budget":
        return src, out.file
    import onnx.utils

    dst = work / f"t{tokens}.onnx"
    onnx.utils.extract_model(str(src), str(dst), [m.vision.input_name], [out.output])
    return dst, out.file


def build_one(
    trt: ModuleType, gpu: tuple[str, str], bundle: Path, m: Manifest, tokens: int, opts: BuildOptions
) -> None:
    """Build, gate and list the engine for budget `tokens`, replacing the budget's previous engine
    (of any precision: the manifest lists one engine per budget). `m` is updated and written
    only when the engine passes its gate; a failure leaves the bundle as it was."""
    rel, side_rel = engine_paths(tokens, opts.precision)
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".trt-") as tmp:
        work = Path(tmp)
        onnx_path, onnx_rel = single_budget_graph(bundle, m, tokens, work)
        frames = m.vision.preprocess
        size = m.vision.image_size
        shapes = input_profile(opts, size, frames)
        broken = [str(v) for v in trt_rules.check_file(onnx_path, {m.vision.input_name: shapes})]
        if broken:
            raise ExportError(
                f"{onnx_rel} breaks TensorRT's rules (export/trt_rules.py):\n  {trt_rules.explain(broken)}"
            )
        calib = None
        if opts.precision == "int8":
            dtype = np.uint8 if frames else np.dtype(m.vision.input_dtype)  # what the graph takes
            files = calibration_files(opts.calib_images)
            batches = calibration_batches(files, opts.calib_batch, calibration_input(m), dtype)
            calib = make_calibrator(batches, opts.calib_batch, bundle / f"vision/t{tokens}.int8.calib")
        profile = profile_record(shapes, frames is not None)
        t0 = time.perf_counter()
        engine = build_engine(onnx_path, m.vision.input_name, opts, size, calib, frames)
        build_s = time.perf_counter() - t0
        engine_sha = hashlib.sha256(engine).hexdigest()
        record = sidecar(
            opts, str(trt.__version__), gpu, engine_sha, onnx_rel, m.file(onnx_rel).sha256, profile
        )
        record["build_seconds"] = round(build_s, 2)
        entry = EngineEntry(
            file=rel,
            sidecar=side_rel,
            precision=opts.precision,
            trt_version=record["trt_version"],
            gpu_name=gpu[0],
            compute_capability=gpu[1],
            profile=record["profile"],
        )
        # The candidate is gated from the work folder, through a copy of the manifest that lists it.
        candidate = work / Path(rel).name
        write_bytes(candidate, engine)
        trial = copy.deepcopy(m)
        trial.vision.engines[str(tokens)] = dataclasses.replace(
            entry, file=candidate.relative_to(bundle).as_posix()
        )
        record.update(gates.engine_gate(bundle, trial, tokens, opts.max_batch, opts.opt_batch))
        floor = gates.ENGINE_MIN_COSINE[opts.precision]
        if record["parity"]["cosine"] < floor:
            raise ExportError(
                f"engine t{tokens} differs from onnxruntime: cosine {record['parity']['cosine']:.5f} "
                f"< {floor} ({opts.precision}); the bundle is unchanged"
            )
        os.replace(candidate, bundle / rel)
        write_json(bundle / side_rel, record, sort_keys=True)
    list_engine(bundle, m, tokens, entry, {str(tokens): record["parity"]})


def list_engine(bundle: Path, m: Manifest, tokens: int, entry: EngineEntry, parity: dict[str, Any]) -> None:
    """Make `entry` the budget's one engine in `m` (files and hashes too), write the manifest,
    then delete the files of the engine it replaced."""
    old = m.vision.engines.get(str(tokens))
    replaced = {old.file, old.sidecar} if old else set()
    m.vision.engines[str(tokens)] = entry
    m.files = [f for f in m.files if f.path not in replaced | {entry.file, entry.sidecar}]
    m.files += [
        file_entry(
            bundle, entry.file, "vision-engine", precision=entry.precision, budgets=[tokens], parity=parity
        ),
        file_entry(bundle, entry.sidecar, "engine-sidecar"),
    ]
    write_manifest(bundle, m)  # after each engine: a later failure keeps the earlier ones
    for stale in replaced - {entry.file, entry.sidecar}:
        (bundle / stale).unlink(missing_ok=True)


def build_engines(
    trt: ModuleType, gpu: tuple[str, str], bundle: Path, tokens: str, opts: BuildOptions
) -> Manifest:
    """Engines for budgets `tokens` ("36", "36,9" or "all") into `bundle`; the verified manifest."""
    m = verify_bundle(bundle)
    for t in parse_tokens(tokens, tuple(m.budgets)):
        print(
            f"[trt] building t{t} ({opts.precision}) on {gpu[0]} (sm {gpu[1]}), TensorRT {trt.__version__} ..."
        )
        need = sum(f.bytes for f in m.files if f.role in ("vision-onnx", "vision-data"))  # ~ one engine
        with update_dir(bundle, need=need, what=f"engine t{t} of {bundle.name}") as work:
            build_one(trt, gpu, work, m, t, opts)  # the engine and the manifest change in one step
    return verify_bundle(bundle)


def engines_summary(m: Manifest) -> str:
    return json.dumps({t: dataclasses.asdict(e) for t, e in m.vision.engines.items()}, indent=1)
