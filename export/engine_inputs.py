"""What a TensorRT engine takes while it is built (export.engines):

- frame-input graphs: the optimization profile over the frame's height and width (1x1 up to
  the bundle's --max-frame, tuned for --opt-frame), and their preprocessing layers kept in
  fp32 under --fp16/--int8;
- INT8 calibration: a folder of images -> full batches of what the graph takes (pixels
  [B, 3, S, S] float32, or for a frame-input graph the host's pad + resize as uint8 frames
  [B, S, S, 3], one size so that they batch), the entropy calibrator over them (with its
  cache file) and the profile calibration runs at.

No torch (a runtime-only Jetson has none): the images are preprocessed by fmvr.preprocess
(PIL + numpy) and the calibrator's device buffer comes from cuda-python. tensorrt and
cuda-python are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.common import ExportError
from export.framegraph import PREFIX as PREPROCESS_PREFIX
from runtime.bundle import GraphPreprocess, Manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_OPT_FRAME = (1280, 720)  # (W, H) a frame-input engine is tuned for, within the bundle's maximum


# ---- frame-input graphs --------------------------------------------------------------------------


def frame_profile(
    batch: Mapping[str, tuple[int, ...]], opt_frame: tuple[int, int] | None, spec: GraphPreprocess
) -> dict[str, tuple[int, int, int, int]]:
    """The optimization profile of a frame-input graph's frames: {min, opt, max} -> (B, H, W, 3),
    the batches of `batch` (export.engines.profile_shapes), frames from 1x1 to the bundle's
    declared maximum, tuned for opt_frame (W, H; None: DEFAULT_OPT_FRAME within the maximum)."""
    default = (min(DEFAULT_OPT_FRAME[0], spec.max_width), min(DEFAULT_OPT_FRAME[1], spec.max_height))
    ow, oh = opt_frame or default
    if not (1 <= ow <= spec.max_width and 1 <= oh <= spec.max_height):
        raise ExportError(
            f"--opt-frame {ow}x{oh} lies outside the frames this bundle takes (1x1 to "
            f"{spec.max_width}x{spec.max_height}, its --max-frame); pick one within, or re-export "
            "with a larger --max-frame"
        )
    sizes = {"min": (1, 1), "opt": (oh, ow), "max": (spec.max_height, spec.max_width)}
    return {k: (batch[k][0], *sizes[k], 3) for k in ("min", "opt", "max")}


def profile_record(shapes: dict[str, tuple[int, int, int, int]], frames: bool) -> dict[str, int]:
    """The sidecar's and the manifest's `profile`: batches, and the frame sizes when frames go in."""
    rec = {f"{k}_batch": shapes[k][0] for k in ("min", "opt", "max")}
    if frames:
        rec.update(
            {
                f"{k}_{d}": shapes[k][i]
                for k in ("min", "opt", "max")
                for d, i in (("height", 1), ("width", 2))
            }
        )
    return rec


def keep_preprocessing_fp32(network: Any, config: Any) -> int:
    """Under --fp16/--int8, ask that the in-graph preprocessing (layers named preprocess/...) run
    in fp32: it rounds grey levels to integers, and int8 ranges calibrated on one frame size do
    not hold for another. Returns the number of layers constrained."""
    import tensorrt as trt

    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        floats = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype == trt.float32]
        if not layer.name.startswith(PREPROCESS_PREFIX) or not floats:
            continue
        layer.precision = trt.float32
        for j in floats:
            layer.set_output_type(j, trt.float32)
        count += 1
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return count


# ---- INT8 calibration ------------------------------------------------------------------------------


def calibration_files(folder: str | None) -> list[Path]:
    if not folder:
        raise ExportError(
            "--int8 needs --calib-images DIR: a folder of representative images (100-500 is typical)"
        )
    d = Path(folder)
    if not d.is_dir():
        raise ExportError(f"--calib-images {folder}: not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"--calib-images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def calibration_batches(
    files: list[Path], batch: int, preprocess: Callable[[list[Path]], np.ndarray], dtype: Any = np.float32
) -> Iterator[np.ndarray]:
    """Full batches of preprocessed images (pixels [batch, 3, S, S] float32, or for a frame-input
    graph uint8 frames [batch, S, S, 3]); a short remainder is dropped."""
    if len(files) < batch:
        raise ExportError(f"INT8 calibration needs at least {batch} images (one batch); found {len(files)}")
    for i in range(0, len(files) - batch + 1, batch):
        yield np.ascontiguousarray(preprocess(files[i : i + batch]), dtype=dtype)  # [batch, ...]


def make_calibrator(batches: Iterator[np.ndarray], batch: int, cache: Path, cudart: Any = None) -> Any:
    """IInt8EntropyCalibrator2 over preprocessed batches; the cache file skips recalibration.
    One device buffer (cuda-python), sized by the first batch, reused for every batch."""
    import tensorrt as trt

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device: Any = None  # cudaMalloc'd pointer
            self.nbytes = 0

        def get_batch_size(self) -> int:
            return batch  # ignored for explicit-batch networks: the calibration profile sets it

        def get_batch(self, names: list[str]) -> list[int]:
            arr = next(batches, None)
            if arr is None:
                self.free()
                return []
            rt = cudart or _runtime()
            if self.device is None:
                err, self.device = rt.cudaMalloc(arr.nbytes)
                _ok(err, "cudaMalloc")
                self.nbytes = arr.nbytes
            if arr.nbytes != self.nbytes:  # every batch has the calibration profile's one shape
                raise ExportError(f"calibration batch of {arr.nbytes} bytes, expected {self.nbytes}")
            h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            _ok(rt.cudaMemcpy(self.device, arr.ctypes.data, arr.nbytes, h2d)[0], "cudaMemcpy")
            return [int(self.device)]

        def free(self) -> None:
            if self.device is not None:
                (cudart or _runtime()).cudaFree(self.device)
                self.device = None

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return Calibrator()


def _runtime() -> Any:
    from runtime.vision import _cudart

    return _cudart()


def _ok(err: Any, what: str) -> None:
    if int(err) != 0:
        raise ExportError(f"{what} failed during INT8 calibration: CUDA error {int(err)}")


def calibration_profile(
    builder: Any, input_name: str, batch: int, size: int, frames: GraphPreprocess | None, profile: Any = None
) -> Any:
    """The profile INT8 calibration runs at: one fixed shape, the calibration batch's own
    (calib batch, 3, S, S) pixels or (calib batch, S, S, 3) host-resized frames. TensorRT
    calibrates at the calibration profile's opt shape: the build profile's opt (batch 1 by
    default) would read 1 image of each 8-image batch, and past the buffer when opt > calib batch."""
    import tensorrt as trt

    fixed = builder.create_optimization_profile()
    shape = trt.Dims([batch, size, size, 3] if frames is not None else [batch, 3, size, size])
    fixed.set_shape(input_name, shape, shape, shape)
    return fixed


def calibration_input(m: Manifest) -> Callable[[list[Path]], np.ndarray]:
    """Image files -> what the graph takes: pixels [B, 3, S, S], or for a frame-input graph the
    host's pad + resize as uint8 frames [B, S, S, 3] (one size, so they batch)."""
    from fmvr.preprocess import Preprocessor, load_image

    pre = Preprocessor.from_dict(m.preprocessing)
    if m.vision.frame_input:
        return lambda paths: pre.resized([load_image(p) for p in paths])
    return lambda paths: pre([load_image(p) for p in paths])
