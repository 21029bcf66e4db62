"""fmvr.preprocess: parity with transformers' CLIPImageProcessor, odd image modes, clear errors."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fmvr.config import CLIP_MEAN, CLIP_STD
from fmvr.preprocess import (
    ImageError,
    Preprocessor,
    expand2square,
    load_image,
    pad_color,
    preprocess,
)

PAD = (122, 116, 104)  # tuple(int(x * 255) for x in CLIP_MEAN), as LLaVA computes it


@pytest.fixture(scope="module")
def clip_processor():
    """The slow (PIL) CLIPImageProcessor with openai/clip-vit-large-patch14-336's settings.

    transformers 5.23's `CLIPImageProcessor` name resolves to the torchvision backend and,
    without torchvision installed, falls back to this class with a warning; we name it
    directly so the reference stays the PIL one even where torchvision is installed.
    """
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=Image.Resampling.BICUBIC,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def _reference(proc, img: Image.Image) -> np.ndarray:
    padded = expand2square(img.convert("RGB"), PAD)
    return proc(images=padded, return_tensors="np")["pixel_values"][0]


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---- parity ----------------------------------------------------------------------------------


def test_pad_color_is_llavas():
    assert pad_color(CLIP_MEAN) == PAD


def test_parity_real_photos(real_images, clip_processor):
    for img in real_images:  # 640x427 landscape photos
        ours = preprocess(img)
        ref = _reference(clip_processor, img)
        assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-5
        np.testing.assert_array_equal(ours, ref)  # in fact the same operations, bit for bit


def test_parity_portrait_and_odd_sizes(real_images, clip_processor):
    photo = real_images[0]
    for box in [(0, 0, 201, 427), (100, 50, 613, 77), (10, 10, 346, 346), (0, 0, 15, 9)]:
        img = photo.crop(box)
        assert np.abs(preprocess(img) - _reference(clip_processor, img)).max() <= 1e-5, box


def test_pad_places_image_in_the_middle_with_mean_colour():
    img = Image.new("RGB", (300, 100), (255, 0, 0))  # wide: padded top and bottom
    x = preprocess(img)
    pad = (np.array(PAD) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    red = (np.array([1.0, 0, 0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[:, 5, 168], pad, atol=1e-5)  # top band
    np.testing.assert_allclose(x[:, 330, 168], pad, atol=1e-5)  # bottom band
    np.testing.assert_allclose(x[:, 168, 5], red, atol=1e-5)  # image spans the full width


def test_preprocess_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import fmvr.preprocess as p; from PIL import Image\n"
        "assert p.preprocess(Image.new('RGB', (20, 10))).shape == (3, 336, 336)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_preprocessor_config_and_manifest_round_trip(tiny_cfg, real_images):
    pre = Preprocessor.from_config(tiny_cfg)
    assert (pre.size, pre.mean, pre.std) == (336, tuple(CLIP_MEAN), tuple(CLIP_STD))
    d = pre.to_dict()
    assert d["pad_color"] == list(PAD) and d["resample"] == "bicubic"
    assert Preprocessor.from_dict(d) == pre
    batch = pre(real_images)
    assert batch.shape == (2, 3, 336, 336) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(real_images[1]))
    assert pre(real_images[0]).shape == (1, 3, 336, 336)
    with pytest.raises(ValueError, match="resample"):
        Preprocessor.from_dict({**d, "resample": "bilinear"})
    with pytest.raises(ValueError, match="pad_color"):
        Preprocessor.from_dict({**d, "pad_color": [0, 0, 0]})


def test_other_size_and_mean():
    pre = Preprocessor(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre(Image.new("RGB", (50, 20), (255, 255, 255)))
    assert x.shape == (1, 3, 224, 224)
    assert pre.pad_color == (127, 127, 127)
    np.testing.assert_allclose(x[0, :, 0, 0], (127 / 255 - 0.5) / 0.5, atol=1e-6)


# ---- odd modes -------------------------------------------------------------------------------


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    out = load_image(img)
    assert out.mode == "RGB"
    return out.getpixel(xy)


def test_grayscale_and_bilevel():
    assert _pixel(Image.new("L", (8, 8), 100)) == (100, 100, 100)
    assert _pixel(Image.new("1", (8, 8), 1)) == (255, 255, 255)


def test_alpha_is_composited_over_the_pad_colour():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    out = load_image(_png_bytes(rgba))
    assert out.getpixel((0, 0)) == PAD  # fully transparent -> pad colour, not black
    assert out.getpixel((1, 1)) == (0, 0, 255)
    r, g, b = out.getpixel((2, 2))  # half transparent -> halfway
    assert abs(r - PAD[0] / 2) <= 2 and abs(b - (PAD[2] + 255) / 2) <= 2
    assert _pixel(Image.new("LA", (4, 4), (200, 0))) == PAD


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(_png_bytes(pal)).getpixel((0, 0)) == (10, 200, 30)
    pal.info["transparency"] = 1
    assert load_image(_png_bytes(pal, transparency=1)).getpixel((0, 0)) == PAD


def test_cmyk():
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    assert _pixel(cmyk) == (0, 255, 255)
    jpg = load_image(_png_bytes(cmyk, "JPEG", quality=95))
    assert jpg.mode == "RGB" and np.abs(np.asarray(jpg, int) - [0, 255, 255]).max() <= 3


def test_16_bit_is_scaled_not_clipped():
    a = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)  # [1, 4]
    img = Image.open(io.BytesIO(_png_bytes(Image.fromarray(a))))
    assert img.mode == "I;16"
    out = np.asarray(load_image(img))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 4, 128, 255])  # /257, not clipped at 255
    as_i = Image.fromarray(a.astype(np.int32))  # PIL mode "I" holding 16-bit data
    np.testing.assert_array_equal(np.asarray(load_image(as_i))[0, :, 0], [0, 4, 128, 255])
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(f))[0, :, 0], [0, 128, 255])


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = load_image(_png_bytes(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    top, bottom = np.asarray(out, int)[5, 10], np.asarray(out, int)[35, 10]
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_uses_first_frame():
    frames = [Image.new("P", (4, 4), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


# ---- errors ----------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: signature + IHDR (+ IEND), no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_corrupt_bytes():
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image, just some bytes")


def test_truncated_jpeg(real_images):
    data = _png_bytes(real_images[0], "JPEG", quality=90)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # opened by the caller, not decoded yet
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess(lazy)


def test_empty_bytes_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        preprocess(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="path, bytes, a PIL image or a frame"):
        load_image(12345)  # type: ignore[arg-type]


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # 10000 x 10000 = 100 MP: under PIL's own hard limit, over ours. The file holds no pixel
    # data, so a size error (not a truncation error) proves the check ran before decoding.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(10_000, 10_000))
    with pytest.raises(ImageError, match=r"10000x10000 = 100,000,000 pixels exceeds the limit"):
        load_image(bomb)
    with pytest.raises(ImageError, match="decompression"):
        load_image(_png_header(100_000, 100_000))  # PIL's own bomb check, reported the same way


def test_max_pixels_is_configurable(real_images):
    data = _png_bytes(real_images[0])
    with pytest.raises(ImageError, match="exceeds the limit of 1,000"):
        load_image(data, max_pixels=1000)
    with pytest.raises(ImageError, match="exceeds"):
        Preprocessor(max_pixels=1000)(real_images[0])
    assert load_image(data, max_pixels=640 * 427).size == (640, 427)
