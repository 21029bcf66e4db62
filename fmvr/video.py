"""Video as images, torch-free (numpy + PIL): uniform frame sampling and the authors' collage.

    uniform_indices(total, n)        n frame indices, one at the centre of each of n equal spans
    read_video(path, n)              n uniformly sampled frames, uint8 RGB [H, W, 3] each; PIL reads
                                     GIF, animated WebP and APNG; other containers (.mp4, ...) go
                                     through imageio (imported lazily) when it has a video plugin
    collage(frames)                  the frames resized to the smallest, tiled round(sqrt(n)) per row,
                                     white tiles filling the last row: one uint8 image
    collage_prompt(question, n)      the question with the sentence saying it is a collage in front
    video_images(frames, question, n, mode)
                                     what to ask: n frames ("frames": N images, newest last) or one
                                     collage of n ("collage"), and the prompt that goes with them

The collage is IG-VLM's / FMVR's demo scheme (`frame_fixed_number = 6`, 2 per row, 3 rows, all
frames resized to the smallest width and height with a bilinear resize, white padding tiles, one
image answered at one budget). IG-VLM samples the first frame of each of n equal spans
(i * floor(total / n), which fails when n > total); we take the centre of each span, which also
samples N = 1 (the middle frame) and n > total (frames repeat, evenly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fmvr.preprocess import DEFAULT_MAX_PIXELS, pad_color, to_rgb

COLLAGE_FRAMES = 6  # the authors' frame_fixed_number
VIDEO_MODES = ("frames", "collage")
WHITE = 255
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


class VideoError(ValueError):
    """A video that cannot be read or sampled: what was wrong and what to do."""


def uniform_indices(total: int, n: int) -> list[int]:
    """`n` indices into `total` frames: the centre of each of n equal spans, in order.

    total=12, n=6 -> [1, 3, 5, 7, 9, 11]; n=1 -> the middle frame; n > total -> frames repeat
    evenly (total=3, n=6 -> [0, 0, 1, 1, 2, 2])."""
    if total < 1:
        raise VideoError(f"the video has no frames (total={total})")
    if n < 1:
        raise VideoError(f"sample at least one frame, got n={n}")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def per_row(n: int) -> int:
    """Tiles per collage row: round(sqrt(n)) as IG-VLM's calculate_max_row (6 -> 2)."""
    return max(1, round(math.sqrt(n)))


def collage(frames: Sequence[Any]) -> np.ndarray:
    """uint8 [rows*h, per_row*w, 3]: every frame resized to the smallest width and the smallest
    height (bilinear), tiled per_row(n) per row in order, the last row filled with white tiles."""
    if not frames:
        raise VideoError("a collage needs at least one frame")
    imgs = [_pil_rgb(f) for f in frames]
    w, h = min(im.width for im in imgs), min(im.height for im in imgs)
    tiles = [np.asarray(im.resize((w, h), Image.Resampling.BILINEAR)) for im in imgs]  # [h, w, 3] each
    cols = per_row(len(tiles))
    tiles += [np.full((h, w, 3), WHITE, np.uint8)] * (-len(tiles) % cols)  # white padding tiles
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]  # [h, cols*w, 3] each
    return np.vstack(rows)  # [rows*h, cols*w, 3]


def collage_sentence(n: int) -> str:
    """What the prompt says about a collage of `n` frames (the authors': "... a collage of six ...")."""
    count = _WORDS[n] if n < len(_WORDS) else str(n)
    return (
        f"The image is a collage of {count} frames sampled uniformly from a video, in chronological "
        f"order from the top left to the bottom right, {per_row(n)} per row."
    )


def collage_prompt(question: str, n: int = COLLAGE_FRAMES) -> str:
    return f"{collage_sentence(n)} {question}"


def video_images(
    frames: Sequence[Any], question: str, n: int = COLLAGE_FRAMES, mode: str = "frames"
) -> tuple[list[Any], str]:
    """(images, prompt) for a question about a video given as its frames (oldest first).

    mode "frames": the n uniformly sampled frames as n images (newest last), the question as is;
    mode "collage": one collage of the n sampled frames, the question after collage_sentence."""
    if mode not in VIDEO_MODES:
        raise VideoError(f"video mode {mode!r}: choose one of {', '.join(VIDEO_MODES)}")
    picked = [frames[i] for i in uniform_indices(len(frames), n)]
    if mode == "frames":
        return picked, question
    return [collage(picked)], collage_prompt(question, n)


# ---- reading ----------------------------------------------------------------------------------


def read_video(path: str | Path, n: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """`n` uniformly sampled frames of the video at `path`, uint8 RGB [H, W, 3] each, oldest first.

    PIL reads GIF, animated WebP and APNG (and a still image as a one-frame video); for other
    containers imageio is used if installed with a video plugin (pip install "imageio[pyav]")."""
    p = Path(path)
    if not p.is_file():
        raise VideoError(f"no video file at {path}")
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        return _read_with_imageio(p, n)
    with img:
        total = getattr(img, "n_frames", 1)
        if img.width * img.height > max_pixels:
            raise VideoError(
                f"video frames of {img.width}x{img.height} exceed the limit of {max_pixels:,} pixels; "
                "downscale the video first"
            )
        return [_frame_at(img, i) for i in uniform_indices(total, n)]


def _frame_at(img: Image.Image, index: int) -> np.ndarray:
    img.seek(index)
    return np.asarray(to_rgb(img.copy(), pad_color()))  # [H, W, 3]; alpha over the pad colour


def _read_with_imageio(p: Path, n: int) -> list[np.ndarray]:
    hint = (
        f"PIL cannot read {p.name}: it reads GIF, animated WebP and APNG. For {p.suffix or 'this'} "
        'files install imageio with a video plugin (pip install "imageio[pyav]"), or convert the '
        "video (ffmpeg -i in.mp4 out.gif), or pass the frames as a list of arrays"
    )
    try:
        import imageio.v3 as iio
    except ImportError:
        raise VideoError(hint + " (imageio is not installed)") from None
    try:
        frames = list(iio.imiter(p))  # [H, W, C] each
    except (OSError, ValueError, RuntimeError) as e:
        raise VideoError(f"{hint} (imageio: {e})") from e
    return [
        np.asarray(to_rgb(Image.fromarray(frames[i]), pad_color())) for i in uniform_indices(len(frames), n)
    ]


def _pil_rgb(frame: Any) -> Image.Image:
    """A frame (uint8 array [H, W, 3|4] or [H, W], or a PIL image) as an RGB PIL image."""
    if isinstance(frame, Image.Image):
        return to_rgb(frame, pad_color())
    a = np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise VideoError(f"a frame must be uint8 [H, W, 3] (or a PIL image), got {a.dtype} {list(a.shape)}")
    return to_rgb(Image.fromarray(a), pad_color())
