"""What a frame-input bundle's vision graph takes: uint8 RGB frames [B, H, W, 3] at their own size.

    frame_batch(image, pre, spec)   any image source -> uint8 [1, H, W, 3], no resize:
                                    numpy arrays / fmvr.frames.Frame as they are (no PIL call
                                    for RGB/BGR/grey), files and bytes decoded (EXIF, -> RGB);
                                    a frame larger than the graph's declared maximum is
                                    downscaled on the host first (aspect kept, antialiased)
    host_batch(image, pre)          the exact option: fmvr.preprocess's pad + bicubic resize on the
                                    host -> uint8 [1, S, S, 3] (the graph's resize is then the identity)
    check_frames(x, spec)           the graph's contract: uint8, [B, H, W, 3], H and W within the
                                    declared maximum; FrameError saying what to do otherwise

Where the bundle has no vision.preprocess record, none of this applies: pixels come from
fmvr.preprocess.Preprocessor on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmvr.frames import Frame, FrameError
from fmvr.preprocess import ImageError, Preprocessor, load_image
from runtime.bundle import GraphPreprocess

PREPROCESS = ("auto", "graph", "host")  # runtime choice: auto = what the bundle's graphs do


def too_large(width: int, height: int, spec: GraphPreprocess) -> str | None:
    """Why a width x height frame does not fit the graph's declared maximum, or None."""
    if width <= spec.max_width and height <= spec.max_height:
        return None
    return (
        f"frame {width}x{height} (width x height) exceeds this bundle's declared maximum "
        f"{spec.max_width}x{spec.max_height}: downscale it to fit, load the pipeline with "
        "preprocess='host' (PIL on the host takes any size), or re-export the bundle with a larger "
        f"--max-frame (e.g. --max-frame {max(width, spec.max_width)}x{max(height, spec.max_height)})"
    )


def check_frames(x: Any, spec: GraphPreprocess) -> np.ndarray:
    """`x` as the graph takes it (uint8 [B, H, W, 3], C-contiguous), or FrameError."""
    if not isinstance(x, np.ndarray):
        raise FrameError(f"expected a numpy array of frames [B, H, W, 3], got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise FrameError(
            f"frames of dtype {x.dtype}: this bundle's vision graph takes uint8 RGB frames [B, H, W, 3] "
            "and preprocesses them itself; pass the camera's uint8 pixels (not normalised floats: "
            "np.clip(x * 255, 0, 255).round().astype(np.uint8) for floats in 0..1)"
        )
    if x.ndim != 4 or x.shape[3] != 3 or min(x.shape[:3]) < 1:
        raise FrameError(
            f"frames of shape {list(x.shape)}: expected [B, H, W, 3] RGB; fmvr.frames.Frame.from_array(a).rgb(...) "
            "converts BGR, RGBA and grey frames"
        )
    why = too_large(int(x.shape[2]), int(x.shape[1]), spec)
    if why:
        raise FrameError(why)
    return np.ascontiguousarray(x)


def frame_batch(image: Any, pre: Preprocessor, spec: GraphPreprocess) -> np.ndarray:
    """One image source -> uint8 [1, H, W, 3] RGB at its own size (ImageError if unusable)."""
    if not isinstance(image, (np.ndarray, Frame)):
        rgb = np.asarray(load_image(image, pre.max_pixels, pre.pad_color))  # decoded, [H, W, 3]
        _refuse(rgb.shape[1], rgb.shape[0], pre)
        return fit(rgb, spec)[None]  # [1, H, W, 3]
    try:
        frame = image if isinstance(image, Frame) else Frame.from_array(image)  # bare arrays are RGB
        frame.check()
    except FrameError as e:
        raise ImageError(str(e)) from e
    _refuse(frame.width, frame.height, pre)
    return fit(np.ascontiguousarray(frame.rgb(pre.pad_color)), spec)[None]  # alpha over the pad colour


def fit(rgb: np.ndarray, spec: GraphPreprocess) -> np.ndarray:
    """uint8 [H, W, 3] as it is when the graph takes it, else downscaled on the host to fit the
    declared maximum: aspect kept, antialiased (PIL's box filter averages every source pixel, so a
    thin 4000x40 banner keeps its content). The graph's own pad + resize then brings it to the
    tower's size, as the host path does from the original (answers compared in the tests)."""
    h, w = rgb.shape[:2]
    if too_large(w, h, spec) is None:
        return rgb
    from PIL import Image

    scale = min(spec.max_width / w, spec.max_height / h)
    size = (max(1, min(spec.max_width, round(w * scale))), max(1, min(spec.max_height, round(h * scale))))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _refuse(width: int, height: int, pre: Preprocessor) -> None:
    if width * height > pre.max_pixels:
        raise ImageError(
            f"frame {width}x{height} = {width * height:,} pixels exceeds the limit of {pre.max_pixels:,} "
            "(decompression-bomb guard); downscale it first"
        )


def host_batch(image: Any, pre: Preprocessor) -> np.ndarray:
    """fmvr.preprocess's pad + resize on the host: uint8 [1, S, S, 3] (bit-exact pixels in the graph)."""
    return pre.resized(image)  # [1, S, S, 3]


def resolve(requested: str, spec: GraphPreprocess | None) -> str:
    """'graph' or 'host' for a bundle (spec None: its graphs take pixels) and a request."""
    if requested not in PREPROCESS:
        raise ValueError(f"preprocess {requested!r}: choose one of {', '.join(PREPROCESS)}")
    if requested == "graph" and spec is None:
        raise ValueError(
            "preprocess 'graph': this bundle's vision graphs take preprocessed pixels (exported with "
            "--preprocess host or before frame input existed); use preprocess='auto' or re-export "
            "with --preprocess graph"
        )
    if requested == "auto":
        return "graph" if spec is not None else "host"
    return requested


def vision_input(image: Any, mode: str, pre: Preprocessor, spec: GraphPreprocess | None) -> np.ndarray:
    """What the bundle's vision graphs take for `image`: frames [1, H, W, 3] (mode 'graph'), the
    host's pad + resize as a frame [1, S, S, 3] (mode 'host', frame-input graphs) or pixels
    [1, 3, S, S] (graphs without in-graph preprocessing)."""
    if spec is None:
        return pre(image)  # [1, 3, S, S]
    if mode == "host":
        return host_batch(image, pre)  # [1, S, S, 3]
    return frame_batch(image, pre, spec)  # [1, H, W, 3]


def blank_input(pre: Preprocessor, spec: GraphPreprocess | None) -> np.ndarray:
    """An all-zero input of the graphs' kind (warm-up)."""
    if spec is None:
        return np.zeros((1, 3, pre.size, pre.size), dtype=np.float32)  # [1, 3, S, S]
    return np.zeros((1, pre.size, pre.size, 3), dtype=np.uint8)  # [1, S, S, 3]
