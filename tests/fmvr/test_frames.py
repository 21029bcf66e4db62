import io

import numpy as np
import pytest
from PIL import Image

from fmvr.frames import Frame, FrameError
from fmvr.preprocess import ImageError, Preprocessor, preprocess

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # [H, W, 3], not square: padding runs


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_rgb_array_equals_the_file_path():
    assert np.array_equal(preprocess(RGB, 32), preprocess(png(Image.fromarray(RGB)), 32))


def test_bgr_frame_equals_rgb():
    assert np.array_equal(preprocess(Frame.from_array(RGB[:, :, ::-1], order="bgr"), 32), preprocess(RGB, 32))


def test_rgba_and_bgra_composite_like_the_file_path():
    rgba = RNG.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    want = preprocess(png(Image.fromarray(rgba, "RGBA")), 32)
    assert np.array_equal(preprocess(rgba, 32), want)
    bgra = rgba[:, :, [2, 1, 0, 3]]
    assert np.array_equal(preprocess(Frame.from_array(bgra, order="bgr"), 32), want)


def test_grey_frames_equal_the_file_path():
    grey = RGB[:, :, 0]
    assert np.array_equal(preprocess(grey, 32), preprocess(png(Image.fromarray(grey, "L")), 32))
    assert np.array_equal(preprocess(grey[:, :, None], 32), preprocess(grey, 32))
    deep = grey.astype(np.uint16) * 257  # 16-bit, /257 back to the same 8 bits
    assert np.array_equal(preprocess(deep, 32), preprocess(grey, 32))


def test_buffer_with_row_padding_equals_the_array():
    h, w = RGB.shape[:2]
    bgr = RGB[:, :, ::-1]
    step = w * 3 + 16  # rows padded to an alignment, as drivers do
    buf = np.zeros((h, step), np.uint8)
    buf[:, : w * 3] = bgr.reshape(h, w * 3)
    frame = Frame.from_buffer(buf.tobytes(), width=w, height=h, encoding="bgr8", step=step)
    assert np.array_equal(frame.rgb((0, 0, 0)), RGB)


def test_mono16_big_endian_buffer():
    grey = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    frame = Frame.from_buffer(
        grey.astype(">u2").tobytes(), width=7, height=5, encoding="mono16", is_bigendian=True
    )
    assert np.array_equal(frame.pixels, grey)


def test_preprocessor_takes_one_frame_or_a_list():
    pre = Preprocessor(size=32)
    assert pre(RGB).shape == (1, 3, 32, 32)
    assert pre([RGB, Frame.from_array(RGB)]).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Frame.from_array(RGB.astype(np.float32)), "dtype float32: pass uint8"),
        (lambda: Frame.from_array(RGB[:, :, :2]), r"shape \(48, 64, 2\)"),
        (lambda: Frame.from_array(RGB, order="yuv"), "choose rgb or bgr"),
        (
            lambda: Frame.from_buffer(b"\0" * 10, 4, 4, "rgb8"),
            "buffer holds 10 bytes; 4x4 rgb8 with step 12 needs 48",
        ),
        (lambda: Frame.from_buffer(b"\0" * 48, 4, 4, "yuv422"), "encoding 'yuv422' is not supported"),
        (lambda: Frame.from_buffer(b"\0" * 48, 4, 4, "rgb8", step=8), "step 8 is shorter than a row"),
        (lambda: Frame.from_buffer(b"", 0, 4, "rgb8"), "no pixels"),
    ],
)
def test_bad_frames_say_what_is_wrong(make, match):
    with pytest.raises(FrameError, match=match):
        make()


def test_frame_errors_are_image_errors_and_size_is_guarded():
    with pytest.raises(ImageError, match="dtype float64"):
        preprocess(np.zeros((4, 4, 3)), 32)
    with pytest.raises(ImageError, match="exceeds the limit"):
        preprocess(RGB, 32, max_pixels=100)
