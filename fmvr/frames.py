"""Camera frames as input, torch-free: numpy arrays and raw buffers, no encode/decode round trip.

    Frame.from_array(arr)            uint8 [H, W, 3] RGB (order="bgr" for OpenCV), [H, W, 4]
                                     RGBA/BGRA, [H, W] or [H, W, 1] grey (uint8 or uint16)
    Frame.from_buffer(data, width=, height=, encoding=, step=)
                                     the fields of a ROS sensor_msgs/Image, as they arrive

`Frame.rgb(background)` gives uint8 [H, W, 3] RGB, alpha composited over `background` (the
model's pad colour, as the file path does), 16-bit grey scaled by /257 as the file path does.
fmvr.preprocess takes a Frame (or a bare array, read as RGB) wherever it takes an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# ROS sensor_msgs/image_encodings we read: name -> (channels, channel order, numpy dtype)
ENCODINGS: dict[str, tuple[int, str, type]] = {
    "rgb8": (3, "rgb", np.uint8),
    "bgr8": (3, "bgr", np.uint8),
    "rgba8": (4, "rgba", np.uint8),
    "bgra8": (4, "bgra", np.uint8),
    "mono8": (1, "grey", np.uint8),
    "mono16": (1, "grey", np.uint16),
}
_BY_CHANNELS = {(3, "rgb"): "rgb8", (3, "bgr"): "bgr8", (4, "rgb"): "rgba8", (4, "bgr"): "bgra8"}


class FrameError(ValueError):
    """A frame that cannot be read: wrong dtype, shape, encoding, size or buffer length."""


@dataclass(frozen=True)
class Frame:
    """Uncompressed pixels and their encoding (a ROS encoding name)."""

    pixels: np.ndarray  # [H, W, C] or [H, W]
    encoding: str = "rgb8"

    @classmethod
    def from_array(cls, arr: Any, order: str = "rgb") -> Frame:
        """A numpy array as a camera or OpenCV hands it over; order "rgb" or "bgr" (OpenCV)."""
        if order not in ("rgb", "bgr"):
            raise FrameError(f"channel order {order!r}: choose rgb or bgr")
        if not isinstance(arr, np.ndarray):
            raise FrameError(f"expected a numpy array, got {type(arr).__name__}")
        if arr.dtype not in (np.uint8, np.uint16):
            raise FrameError(
                f"frame dtype {arr.dtype}: pass uint8 pixels in 0..255 (or uint16 grey), "
                "e.g. np.clip(x * 255, 0, 255).round().astype(np.uint8)"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            return cls(arr, "mono16" if arr.dtype == np.uint16 else "mono8").check()
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise FrameError(f"frame shape {arr.shape}: expected [H, W, 3], [H, W, 4], [H, W] or [H, W, 1]")
        if arr.dtype != np.uint8:
            raise FrameError(f"colour frames must be uint8, got {arr.dtype}")
        return cls(arr, _BY_CHANNELS[(arr.shape[2], order)]).check()

    @classmethod
    def from_buffer(
        cls,
        data: bytes | bytearray | memoryview,
        width: int,
        height: int,
        encoding: str,
        step: int = 0,
        is_bigendian: bool = False,
    ) -> Frame:
        """The fields of a sensor_msgs/Image: `step` is the row length in bytes (0: packed rows)."""
        if encoding not in ENCODINGS:
            raise FrameError(f"encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}")
        channels, _, dtype = ENCODINGS[encoding]
        if width < 1 or height < 1:
            raise FrameError(f"frame has no pixels ({width}x{height})")
        row = width * channels * np.dtype(dtype).itemsize
        step = step or row
        if step < row:
            raise FrameError(f"step {step} is shorter than a row of {width} {encoding} pixels ({row} bytes)")
        need = step * (height - 1) + row
        buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if buf.size < need:
            raise FrameError(
                f"buffer holds {buf.size} bytes; {width}x{height} {encoding} with step {step} needs {need}"
            )
        rows = np.lib.stride_tricks.as_strided(buf, (height, row), (step, 1))  # [H, row bytes], a view
        pixels = np.ascontiguousarray(rows).view(np.dtype(dtype).newbyteorder(">" if is_bigendian else "<"))
        pixels = pixels.astype(dtype).reshape(height, width, channels)  # [H, W, C]
        return cls(pixels[:, :, 0] if channels == 1 else pixels, encoding).check()

    def check(self) -> Frame:
        if self.encoding not in ENCODINGS:
            raise FrameError(
                f"encoding {self.encoding!r} is not supported; use one of {', '.join(ENCODINGS)}"
            )
        channels, _, dtype = ENCODINGS[self.encoding]
        want = (2,) if channels == 1 else (3,)
        if self.pixels.ndim not in want or (channels > 1 and self.pixels.shape[2] != channels):
            raise FrameError(f"{self.encoding} frame with pixels of shape {self.pixels.shape}")
        if self.pixels.dtype != dtype:
            raise FrameError(
                f"{self.encoding} frame with {self.pixels.dtype} pixels (expected {np.dtype(dtype)})"
            )
        if self.pixels.shape[0] < 1 or self.pixels.shape[1] < 1:
            raise FrameError(f"frame has no pixels ({self.width}x{self.height})")
        return self

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def rgb(self, background: tuple[int, int, int]) -> np.ndarray:
        """uint8 [H, W, 3] RGB; alpha over `background`, 16-bit grey / 257."""
        _, order, _ = ENCODINGS[self.encoding]
        p = self.pixels
        if order == "grey":
            grey = p if p.dtype == np.uint8 else np.rint(p / 257.0).astype(np.uint8)  # [H, W]
            return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W, 3]
        if order.startswith("bgr"):
            p = p[:, :, [2, 1, 0, 3][: p.shape[2]]]  # -> RGB(A)
        if p.shape[2] == 3:
            return np.ascontiguousarray(p)
        return _over(p, background)


def _over(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGBA uint8 [H, W, 4] over an opaque background -> RGB uint8 [H, W, 3], with PIL's
    alpha_composite, as the file path composites."""
    from PIL import Image

    h, w = rgba.shape[:2]
    canvas = Image.new("RGBA", (w, h), (*background, 255))
    return np.asarray(Image.alpha_composite(canvas, Image.fromarray(rgba, "RGBA")).convert("RGB"))
