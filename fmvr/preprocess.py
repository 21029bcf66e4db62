"""Image loading and LLaVA-1.5 preprocessing, torch-free (numpy + PIL only).

    src (path | bytes | PIL image | camera frame: numpy array or fmvr.frames.Frame)
      -> load_image: size guard BEFORE decoding, decode, EXIF orientation, -> RGB
         (grayscale, palette, CMYK, 16-bit scaled to 8 bit, alpha composited over the pad colour;
         a frame is read as it is: no encode/decode round trip)
      -> expand2square: pad to a square with the mean colour, image centred (LLaVA "pad")
      -> bicubic resize to size x size, /255, (x - mean) / std   -> float32 [3, S, S]

Numerically this is transformers' CLIPImageProcessor (PIL backend, shortest_edge=S,
crop S) applied to the padded image: same uint8 bicubic resize, the same float64 rescale
then float32 normalisation, so the outputs agree bit for bit (tests/fmvr/test_preprocess.py).

Which CLIPImageProcessor: in transformers 5.23 the name `CLIPImageProcessor` means the
torchvision backend; with torchvision absent (as here) it warns and falls back to
`CLIPImageProcessorPil`, the slow PIL one that LLaVA-1.5 was trained with and that we match.
The torchvision backend resizes uint8 tensors with tvF.resize(bicubic, antialias=True), a
different resampling implementation, so it is not expected to agree to 1e-5 (not measured:
torchvision is not installed). Reference it as `CLIPImageProcessorPil` explicitly.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmvr.config import CLIP_MEAN, CLIP_STD
from fmvr.frames import Frame, FrameError

DEFAULT_SIZE = 336
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: far above any camera frame, far below a bomb
RESAMPLE = "bicubic"

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray | Frame
SINGLE = (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray, Frame)  # one image, not a list


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, corrupt, truncated, empty or too large."""


def pad_color(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """LLaVA's background for expand2square: tuple(int(x * 255) for x in image_mean)."""
    r, g, b = (int(x * 255) for x in mean)
    return (r, g, b)


# ---- loading ---------------------------------------------------------------------------------


def load_image(
    src: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Any image source -> an upright RGB PIL image (decoded, EXIF applied).

    `background` is the colour transparent pixels are composited over (default: the CLIP
    pad colour, so transparency and padding look the same to the model). Raises ImageError.
    """
    bg = pad_color() if background is None else background
    if isinstance(src, (np.ndarray, Frame)):
        return _from_frame(src, max_pixels, bg)
    img = _open(src, max_pixels)
    img = _first_frame(img)
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, bg)


def _from_frame(src: np.ndarray | Frame, max_pixels: int, bg: tuple[int, int, int]) -> Image.Image:
    """A camera frame (a bare array is RGB) -> RGB PIL image; FrameError is an ImageError."""
    try:
        frame = src if isinstance(src, Frame) else Frame.from_array(src)
        frame.check()
    except FrameError as e:
        raise ImageError(str(e)) from e
    _check_pixels((frame.width, frame.height), max_pixels, "frame")
    return Image.fromarray(frame.rgb(bg), "RGB")


def _open(src: ImageSource, max_pixels: int) -> Image.Image:
    """Open `src`, refuse it if w*h > max_pixels (from the header alone), then decode."""
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, "image")
        return _decode(src, "image")
    data, name = _read_bytes(src)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below governs; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    _check_pixels(img.size, max_pixels, name)
    return _decode(img, name)


def _decode(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixel data now (PIL opens lazily), so a bad file fails here, clearly."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            f"{name}: the image data is corrupt or truncated ({type(e).__name__}: {e}); re-export or re-download it"
        ) from e
    return img


def _read_bytes(src: ImageSource) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "image bytes"
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        data, name = path.read_bytes(), str(path)
    else:
        raise TypeError(
            f"expected a path, bytes, a PIL image or a frame (numpy array / fmvr.frames.Frame), got {type(src).__name__}"
        )
    if not data:
        raise ImageError(f"{name}: empty (0 bytes), not an image")
    return data, name


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard); downscale it first or raise max_pixels"
        )


def _first_frame(img: Image.Image) -> Image.Image:
    """Animated GIF/WebP/TIFF: the first frame."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        img = img.copy()
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited over `background`; 16/32-bit is scaled to 8 bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, ...
    except ValueError as e:
        raise ImageError(
            f"image mode {mode!r} cannot be converted to RGB ({e}); convert it to RGB first"
        ) from e


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """High-bit-depth single-channel pixels [H, W] -> uint8 by scaling the range, never clipping.

    Integers within 0..65535 (16-bit data; PIL's "I" mode holds it too) map by /257, so
    65535 -> 255 exactly; floats within [0, 1] map by *255; anything else is min-max scaled.
    """
    x = a.astype(np.float64)  # [H, W]
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        scaled = x * 255.0
    elif np.issubdtype(a.dtype, np.integer) and lo >= 0 and hi <= 65535:
        scaled = x / 257.0
    else:
        scaled = (x - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---- LLaVA "pad" + CLIP ----------------------------------------------------------------------


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: pad the short side with `background`, the image centred."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))  # LLaVA: (0, (w-h)//2) or ((h-w)//2, 0)
    return out


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 image -> float32 [3, H, W], exactly as transformers rescales and normalises."""
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # float64 rescale, then float32
    m = np.asarray(mean, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    s = np.asarray(std, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    return (x - m) / s  # [3, H, W] float32


def preprocess(
    image: ImageSource,
    size: int = DEFAULT_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """One image (any source load_image accepts) -> float32 [3, size, size], LLaVA-1.5 "pad"."""
    return normalize(square_resized(image, size, mean, max_pixels=max_pixels), mean, std)


def square_resized(
    image: ImageSource, size: int, mean: Sequence[float], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load, pad to a square with the mean colour, bicubic resize: the RGB image before normalise."""
    bg = pad_color(mean)
    img = load_image(image, max_pixels=max_pixels, background=bg)
    img = expand2square(img, bg)
    return img.resize((size, size), Image.Resampling.BICUBIC)  # [size, size] RGB


@dataclass(frozen=True)
class Preprocessor:
    """The preprocessing a model was trained with; recorded in a bundle's manifest."""

    size: int = DEFAULT_SIZE
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_config(cls, cfg: Any) -> Preprocessor:
        """From an FMVRConfig: cfg.vision.image_size, cfg.image_mean, cfg.image_std."""
        return cls(size=int(cfg.vision.image_size), mean=_rgb(cfg.image_mean), std=_rgb(cfg.image_std))

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return pad_color(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pad_color": list(self.pad_color),
            "resample": RESAMPLE,
            "aspect": "pad",
            "max_pixels": self.max_pixels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Inverse of to_dict; refuses settings this implementation does not perform."""
        if d.get("resample", RESAMPLE) != RESAMPLE:
            raise ValueError(
                f"resample {d['resample']!r} is not supported; this preprocessor does {RESAMPLE!r}"
            )
        if d.get("aspect", "pad") != "pad":
            raise ValueError(f"aspect {d['aspect']!r} is not supported; this preprocessor does 'pad'")
        out = cls(
            size=int(d["size"]),
            mean=_rgb(d["mean"]),
            std=_rgb(d["std"]),
            max_pixels=int(d.get("max_pixels", DEFAULT_MAX_PIXELS)),
        )
        if "pad_color" in d and tuple(d["pad_color"]) != out.pad_color:
            raise ValueError(f"pad_color {d['pad_color']} does not match the mean's {list(out.pad_color)}")
        return out

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """One image or a list -> float32 [B, 3, S, S]."""
        if isinstance(images, SINGLE):
            images = [images]
        if not images:
            raise ValueError("no images given")
        arrays = [preprocess(im, self.size, self.mean, self.std, max_pixels=self.max_pixels) for im in images]
        return np.stack(arrays)  # [B, 3, S, S]

    def resized(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """The same pad + resize, not normalised: uint8 [B, S, S, 3] (what a frame-input vision
        graph takes to reproduce this path exactly: it pads nothing, its resize is the identity)."""
        if isinstance(images, SINGLE):
            images = [images]
        if not images:
            raise ValueError("no images given")
        arrays = [
            np.asarray(square_resized(im, self.size, self.mean, max_pixels=self.max_pixels)) for im in images
        ]
        return np.stack(arrays)  # [B, S, S, 3]


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """Three floats, one per RGB channel."""
    if len(values) != 3:
        raise ValueError(f"expected 3 values (R, G, B), got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))
