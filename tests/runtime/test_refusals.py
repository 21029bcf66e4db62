"""Bad bundles, other devices' profiles and bad images are refused with clear errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fmvr.preprocess import ImageError
from runtime.bundle import BundleError, EngineEntry, file_entry, read_manifest, write_manifest
from runtime.pipeline import Pipeline
from runtime.profile import ProfileError, device_info, save_profile
from runtime.vision import check_engines, choose_backend

PROMPT = "What is in the picture?"


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def test_flipped_byte_is_refused_with_the_rebuild_command(bundle_copy):
    p = bundle_copy / "vision" / "all.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vision/all.onnx fails its sha256 check.*python -m export"):
        Pipeline.load(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "llm" / "embed_tokens.npy").unlink()
    with pytest.raises(BundleError, match=r"llm/embed_tokens.npy is missing.*python -m export"):
        Pipeline.load(bundle_copy)


def test_missing_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Pipeline.load(bundle_copy)


def test_other_schema_version_is_refused(bundle_copy):
    path = bundle_copy / "manifest.json"
    d = json.loads(path.read_text())
    d["schema_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="schema_version 99"):
        Pipeline.load(bundle_copy)


def test_profile_of_another_device_is_not_used(bundle_copy, synthetic_profile, image_bytes):
    synthetic_profile.device = {**device_info("CPUExecutionProvider"), "cpu": "Some Other CPU"}
    other = save_profile(bundle_copy, synthetic_profile)
    pipe = Pipeline.load(bundle_copy)
    assert pipe.policy is None
    assert other.name in pipe.profile_note and "other devices" in pipe.profile_note
    with pytest.raises(ProfileError, match="python -m runtime profile"):
        pipe.ask(image_bytes[0], PROMPT, latency_ms=100)
    assert pipe.ask(image_bytes[0], PROMPT, tokens=9, max_new_tokens=2).budget == 9  # forced budget works


def test_profile_measured_here_is_used(bundle_copy, image_bytes):
    pipe = Pipeline.load(bundle_copy, profile_if_missing=True, threads=1)
    r = pipe.ask(image_bytes[0], PROMPT, latency_ms=1e6, max_new_tokens=2)  # profiles on first use
    assert r.budget == 576 and r.predicted_deadline_met is True
    prof = pipe.policy.profile
    assert (bundle_copy / f"profile-{prof.key}.json").is_file()
    assert set(prof.vision_ms) == {576, 144, 36, 9, 1} and prof.decode_ms_per_token > 0
    again = Pipeline.load(bundle_copy)
    assert again.policy is not None and again.policy.profile.to_dict() == prof.to_dict()


def _add_engine(bundle, cc="8.7", trt="10.3.0"):
    (bundle / "vision" / "t36.fp16.engine").write_bytes(b"not really an engine")
    (bundle / "vision" / "t36.fp16.engine.json").write_text("{}")
    m = read_manifest(bundle)
    m.vision.engines["36"] = EngineEntry(
        "vision/t36.fp16.engine",
        "vision/t36.fp16.engine.json",
        "fp16",
        trt,
        "Orin",
        cc,
        {"min_batch": 1, "opt_batch": 1, "max_batch": 1},
    )
    m.files += [
        file_entry(bundle, "vision/t36.fp16.engine", "vision-engine"),
        file_entry(bundle, "vision/t36.fp16.engine.json", "engine-sidecar"),
    ]
    write_manifest(bundle, m)
    return m


def test_engine_for_another_gpu_or_tensorrt_is_refused(bundle_copy):
    m = _add_engine(bundle_copy)
    check_engines(bundle_copy, m, ("10.3.0", "8.7"))  # built here: fine
    with pytest.raises(BundleError, match=r"compute capability 8.7.*this GPU is 9.0.*python -m export.trt"):
        check_engines(bundle_copy, m, ("10.3.0", "9.0"))
    with pytest.raises(BundleError, match=r"TensorRT 10.3.0, this device has 10.7.*--tokens 36 --fp16"):
        check_engines(bundle_copy, m, ("10.7", "8.7"))


def test_engines_without_tensorrt_here_are_said_not_silently_skipped(bundle_copy):
    m = _add_engine(bundle_copy)
    name, why = choose_backend(bundle_copy, m, "auto")
    assert name == "ort-cpu" and "TensorRT is not importable" in why
    with pytest.raises(BundleError, match="needs the tensorrt and cuda-python packages"):
        choose_backend(bundle_copy, m, "tensorrt")
    with pytest.raises(BundleError, match="CUDAExecutionProvider"):
        choose_backend(bundle_copy, m, "ort-cuda")


# ---- images ------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"definitely not an image", "not a readable image"),
        (b"", "empty"),
    ],
)
def test_unreadable_images_give_clear_errors(pipe, data, match):
    with pytest.raises(ImageError, match=match):
        pipe.ask(data, PROMPT, tokens=1, max_new_tokens=1)


def test_truncated_jpeg_is_refused(pipe, image_bytes):
    with pytest.raises(ImageError):
        pipe.ask(image_bytes[0][: len(image_bytes[0]) // 3], PROMPT, tokens=1, max_new_tokens=1)


def test_decompression_bomb_is_refused(pipe):
    bomb = _encode(Image.new("1", (12000, 12000)))  # 144 Mpx, a few KB as PNG
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="decompression bomb|too large|pixels"):
        pipe.ask(bomb, PROMPT, tokens=1, max_new_tokens=1)


def _odd_modes(photo: Image.Image) -> dict[str, bytes]:
    small = photo.resize((64, 48))
    a16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    return {
        "cmyk-jpeg": _encode(small.convert("CMYK"), "JPEG"),
        "16-bit-png": _encode(Image.fromarray(a16), "PNG"),
        "rgba-png": _encode(rgba, "PNG"),
        "grayscale-jpeg": _encode(small.convert("L"), "JPEG"),
        "palette-png": _encode(small.convert("P"), "PNG"),
    }


def test_odd_image_modes_are_answered(pipe, real_images):
    for name, data in _odd_modes(real_images[0]).items():
        r = pipe.ask(data, PROMPT, tokens=1, max_new_tokens=2)
        assert r.budget == 1, name
        px = pipe.preprocess(data)
        assert px.shape == (1, 3, 336, 336) and np.isfinite(px).all(), name
