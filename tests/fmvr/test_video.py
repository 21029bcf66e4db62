"""fmvr.video: uniform sampling, the authors' 2-per-row collage, reading animations with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmvr.video import (
    COLLAGE_FRAMES,
    VideoError,
    collage,
    collage_prompt,
    per_row,
    read_video,
    uniform_indices,
    video_images,
)


def solid(value: int, w: int = 40, h: int = 30) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)  # [H, W, 3]


@pytest.mark.parametrize(
    ("total", "n", "want"),
    [
        (12, 6, [1, 3, 5, 7, 9, 11]),  # the centre of each of 6 spans of 2
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (100, 4, [12, 37, 62, 87]),
        (9, 1, [4]),  # N = 1: the middle frame
        (1, 1, [0]),
        (3, 6, [0, 0, 1, 1, 2, 2]),  # N > frames: each frame repeats, evenly, in order
        (1, 3, [0, 0, 0]),
    ],
)
def test_uniform_indices(total, n, want):
    assert uniform_indices(total, n) == want


def test_uniform_indices_refuse_nothing():
    with pytest.raises(VideoError, match="no frames"):
        uniform_indices(0, 6)
    with pytest.raises(VideoError, match="at least one frame"):
        uniform_indices(10, 0)


def test_six_frames_tile_two_per_row_in_three_rows_in_order():
    frames = [solid(10 * (i + 1)) for i in range(COLLAGE_FRAMES)]
    grid = collage(frames)
    assert per_row(6) == 2
    assert grid.shape == (3 * 30, 2 * 40, 3) and grid.dtype == np.uint8
    for i in range(6):  # row-major: frame i at row i // 2, column i % 2
        r, c = divmod(i, 2)
        assert (grid[r * 30 : (r + 1) * 30, c * 40 : (c + 1) * 40] == 10 * (i + 1)).all()


def test_frames_are_resized_to_the_smallest_width_and_height():
    frames = [solid(50, 64, 48), solid(60, 40, 60), solid(70, 80, 30), solid(80), solid(90), solid(100)]
    grid = collage(frames)
    assert grid.shape == (3 * 30, 2 * 40, 3)  # min width 40, min height 30 (from different frames)
    assert (grid[:30, :40] == 50).all() and (grid[30:60, :40] == 70).all()


def test_a_partial_last_row_is_padded_with_white():
    grid = collage([solid(0) for _ in range(5)])  # round(sqrt(5)) = 2 per row: 3 rows, one tile short
    assert grid.shape == (90, 80, 3)
    assert (grid[60:, 40:] == 255).all() and (grid[60:, :40] == 0).all()


def test_video_images_frames_or_one_collage():
    frames = [solid(i) for i in range(12)]
    images, prompt = video_images(frames, "What happens?", 6, "frames")
    assert [int(im[0, 0, 0]) for im in images] == [1, 3, 5, 7, 9, 11] and prompt == "What happens?"
    images, prompt = video_images(frames, "What happens?", 6, "collage")
    assert len(images) == 1 and images[0].shape == (90, 80, 3)
    assert prompt == collage_prompt("What happens?") and "collage of six frames" in prompt
    assert prompt.endswith(" What happens?")
    with pytest.raises(VideoError, match="choose one of frames, collage"):
        video_images(frames, "q", 6, "grid")


def _animation(path, fmt: str, n: int = 10) -> None:
    frames = [Image.fromarray(solid(20 * i + 5)) for i in range(n)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)


@pytest.mark.parametrize(("name", "fmt"), [("v.gif", "GIF"), ("v.webp", "WEBP"), ("v.png", "PNG")])
def test_read_video_samples_animations_with_pil(tmp_path, name, fmt):
    path = tmp_path / name
    _animation(path, fmt)
    frames = read_video(path, 4)  # indices 1, 3, 6, 8 of 10
    assert len(frames) == 4 and all(f.shape == (30, 40, 3) and f.dtype == np.uint8 for f in frames)
    got = [int(f[15, 20, 0]) for f in frames]
    assert got == pytest.approx([25, 65, 125, 165], abs=6)  # lossy WebP: a few levels off


def test_an_unreadable_container_says_what_to_install(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(VideoError, match=r"PIL cannot read clip\.mp4.*imageio\[pyav\]"):
        read_video(path, 6)
    with pytest.raises(VideoError, match="no video file"):
        read_video(tmp_path / "missing.gif", 6)
