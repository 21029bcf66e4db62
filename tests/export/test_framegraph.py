"""Preprocessing inside the vision graph (--preprocess graph, the default): uint8 frames at their
own size in; pad, PIL bicubic resize and normalise in the graph (export.framegraph). Parity with
fmvr.preprocess (the PIL path) on real photos and odd aspect ratios, the export's records, old
bundles, the options and flags."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.common import ExportError
from export.framegraph import frame_only_model, parse_frame_size
from export.options import VisionOptions, options_from_build
from fmvr.preprocess import Preprocessor

# Measured here (onnxruntime 1.32 CPU) on the photos below: pixel MAE <= 0.0006 grey levels at
# 336 px (tiny), <= 0.00002 at 384 px (small); at most 1 grey level anywhere (a few pixels in 10^4
# round the other way, float32 vs PIL's 22-bit fixed point). Bounds with margin:
PIXEL_MAE = 0.002  # grey levels (0..255), per image
PIXEL_MAX = 1.0 + 1e-3  # one grey level (float rounding of the std scale)
# Feature cosine vs PyTorch on the PIL pixels, tiny model, worst photo: measured 576: 0.99999998,
# 144: 0.999999993, 36: 0.9999999976, 9: 0.999999999, 1: 0.9999999998. Bounds 10x looser:
FEATURE_COSINE = {576: 0.9999998, 144: 0.99999993, 36: 0.99999997, 9: 0.99999999, 1: 0.999999998}


@pytest.fixture(scope="module")
def photos(real_images):
    """Real photos (427x640 landscape) and odd aspect ratios, width x height: a 640x360 (16:9)
    crop and a 200x500 portrait crop; uint8 RGB [H, W, 3]."""
    china, flower = (np.asarray(im) for im in real_images)
    return {
        "china 640x427": china,
        "flower 640x427": flower,
        "china crop 640x360": np.ascontiguousarray(china[:360, :640]),
        "flower rotated crop 200x500": np.ascontiguousarray(np.rot90(flower)[60:560, 100:300]),
    }


def grey_levels(got: np.ndarray, ref: np.ndarray, pre: Preprocessor) -> np.ndarray:
    """|got - ref| of normalised pixels [.., 3, S, S] back in 0..255 units."""
    return np.abs(got - ref) * np.asarray(pre.std, np.float32)[:, None, None] * 255


@pytest.mark.parametrize("preset_name", ["tiny", "small"])
def test_in_graph_preprocessing_matches_pil(photos, preset_name):
    """The preprocessing subgraph alone vs fmvr.preprocess: a few pixels one grey level off; fed
    the host's own pad + resize it reproduces the normalised pixels bit for bit."""
    from fmvr.config import preset

    pre = Preprocessor.from_config(preset(preset_name))
    sess = ort.InferenceSession(
        frame_only_model(pre, 18).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for name, photo in photos.items():
        ref = pre(photo)  # [1, 3, S, S]
        got = sess.run(None, {"frames": photo[None]})[0]  # [1, 3, S, S]
        err = grey_levels(got, ref, pre)
        assert got.shape == ref.shape and got.dtype == np.float32, name
        assert err.mean() <= PIXEL_MAE and err.max() <= PIXEL_MAX, (name, err.mean(), err.max())
        exact = sess.run(None, {"frames": pre.resized(photo)})[0]
        np.testing.assert_array_equal(exact, ref, err_msg=name)


@pytest.mark.parametrize("size", [(1920, 1080), (1000, 40), (40, 1000), (385, 383), (384, 384), (17, 9)])
def test_banded_resize_matches_pil_at_extreme_sizes(real_images, size):
    """The banded MatMuls (export.framegraph.BANDS blocks per pass, each reading only the pixels
    its weights touch) at up- and downscales, extreme aspects and odd sizes: the same bounds."""
    from PIL import Image

    from export.framegraph import BANDS
    from fmvr.config import preset

    pre = Preprocessor.from_config(preset("small"))
    model = frame_only_model(pre, 18)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 2 * BANDS
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    photo = np.asarray(real_images[0].resize(size, Image.Resampling.BILINEAR))  # [H, W, 3]
    err = grey_levels(sess.run(None, {"frames": photo[None]})[0], pre(photo), pre)
    assert err.mean() <= PIXEL_MAE and err.max() <= PIXEL_MAX, (size, err.mean(), err.max())


def test_float32_division_by_255_is_the_reference_rescale():
    """export.framegraph's NORMALISE note: v / 255 in float32 equals fmvr.preprocess's float64
    rescale rounded to float32, for every grey level (a float32 multiply by 1/255 would not)."""
    v = np.arange(256)
    ref = (v.astype(np.float64) * (1 / 255)).astype(np.float32)
    np.testing.assert_array_equal(v.astype(np.float32) / np.float32(255), ref)
    assert (v.astype(np.float32) * np.float32(1 / 255) != ref).any()


@pytest.mark.parametrize(("antialias", "measured"), [(False, 4.49), (True, 0.093)])
def test_other_resizes_fail_the_pixel_bound(photos, antialias, measured):
    """The bound has teeth. Plain bicubic (what TensorRT's Resize offers) and the antialiased float
    bicubic without PIL's rounding after each pass (torch's F.interpolate(antialias=True), which
    the dynamo exporter turns into ONNX Resize(antialias=1)) are measured at MAE 4.49 and 0.093
    grey levels on this photo, against PIL."""
    from PIL import Image

    from fmvr.config import preset
    from fmvr.preprocess import expand2square

    pre = Preprocessor.from_config(preset("tiny"))
    photo = photos["china 640x427"]
    square = np.array(expand2square(Image.fromarray(photo), pre.pad_color))  # [640, 640, 3]
    x = torch.from_numpy(square).permute(2, 0, 1)[None].float()  # [1, 3, 640, 640]
    y = torch.nn.functional.interpolate(x, size=(pre.size, pre.size), mode="bicubic", antialias=antialias)
    ref = pre(photo)[0].astype(np.float64) * np.asarray(pre.std)[:, None, None] * 255
    ref += np.asarray(pre.mean)[:, None, None] * 255  # back to 0..255
    mae = np.abs(y[0].clamp(0, 255).round().numpy() - ref).mean()
    assert mae > 10 * PIXEL_MAE and mae == pytest.approx(measured, rel=0.05)


def test_feature_cosine_per_budget_vs_pil_on_real_photos(src, frame_bundle, photos):
    """Frames at their own size through the runtime's backend vs PyTorch on fmvr.preprocess's pixels."""
    from runtime.frame_input import frame_batch
    from runtime.vision import OrtVision

    root, m = frame_bundle
    backend = OrtVision(root, m, "ort-cpu")
    pre = Preprocessor.from_dict(m.preprocessing)
    for name, photo in photos.items():
        got = backend.encode(frame_batch(photo, pre, m.vision.preprocess), list(FEATURE_COSINE))
        with torch.no_grad():
            ref = src.model.encode_budgets(torch.from_numpy(pre(photo)), tuple(FEATURE_COSINE))
        for t, bound in FEATURE_COSINE.items():
            a, b = ref[t].numpy().ravel().astype(np.float64), got[t].ravel().astype(np.float64)
            cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            assert cos >= bound, (name, t, cos)


def test_the_export_records_the_graph_and_its_parity(frame_bundle):
    """Manifest: input frames uint8 NHWC, max size, method; pixel parity and per-budget feature
    parity vs the PIL path, on the photos and the odd crops; the graph's own IO."""
    import onnx

    root, m = frame_bundle
    v, spec = m.vision, m.vision.preprocess
    assert (v.input_name, v.input_dtype, v.frame_input) == ("frames", "uint8", True)
    assert (spec.layout, spec.channels, spec.max_width, spec.max_height) == ("NHWC", "RGB", 1920, 1920)
    assert "bicubic a=-0.5 antialiased" in spec.method and spec.pixels_output == "pixel_values"
    assert spec.parity["ok"] and spec.parity["mean_abs_error"] <= PIXEL_MAE
    assert spec.parity["max_abs_error"] <= PIXEL_MAX
    assert "sklearn:china.jpg[crop 640x360]" in spec.parity["images"]
    for t, rec in m.file("vision/all.onnx").parity.items():
        assert rec["ok"] and rec["cosine"] >= 0.99999  # the host-resized frames: the exact path
        assert rec["frames"]["ok"] and rec["frames"]["min_cosine"] >= FEATURE_COSINE[int(t)], t
        assert len(rec["frames"]["images"]) == 6
    g = onnx.load(str(root / "vision/all.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    assert g.input[0].name == "frames" and dims == ["batch", "height", "width", 3]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in g.output] == [f"tokens_{t}" for t in (576, 144, 36, 9, 1)]
    # vision/preprocess.onnx: the same preprocessing nodes alone, hash-listed
    assert spec.graph == "vision/preprocess.onnx" and m.file(spec.graph).role == "vision-preprocess"
    alone = onnx.load(str(root / spec.graph)).graph
    ops = [(n.name, n.op_type) for n in g.node if n.name.startswith("preprocess/")]
    assert ops == [(n.name, n.op_type) for n in alone.node] and [o.name for o in alone.output] == [
        "pixel_values"
    ]
    assert "--preprocess graph --max-frame 1920x1920" in m.build["command"]
    assert m.build["vision"]["preprocess"] == "graph" and m.schema_version == 3


def test_fp16_graph_preprocesses_in_fp32(src, tmp_path):
    from export.build import build_bundle
    from export.gates import FP16_MIN_COSINE

    out, m = build_bundle(src, tmp_path / "b", tokens=(9,), vision=VisionOptions(precision="fp16"), llm=None)
    assert m.vision.input_dtype == "uint8" and m.files[0].path == "vision/all.fp16.onnx"
    rec = m.files[0].parity["9"]
    assert rec["ok"] and rec["frames"]["min_cosine"] >= FP16_MIN_COSINE
    assert m.vision.preprocess.parity["mean_abs_error"] <= PIXEL_MAE  # pixels stay float32


def test_a_frame_parity_failure_names_the_budget(src, tmp_path, monkeypatch):
    import export.gates as eg
    from export.build import build_bundle

    monkeypatch.setattr(eg, "FRAME_MIN_COSINE", 1.5)
    with pytest.raises(ExportError, match=r"vision/all.onnx T=9 on frames: cosine"):
        build_bundle(src, tmp_path / "b", tokens=(9,), llm=None)
    assert list(tmp_path.iterdir()) == []


def test_old_bundles_without_the_record_load_and_use_pil(bundle_copy, monkeypatch, image_bytes_jpeg):
    """A schema-2 manifest (no vision.preprocess, build options without it) loads; the runtime
    preprocesses with fmvr.preprocess on the host and feeds pixels."""
    from runtime.bundle import MANIFEST_NAME, read_manifest, verify_bundle, write_manifest
    from runtime.pipeline import Pipeline

    raw = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    raw["schema_version"] = 2
    raw["vision"].pop("preprocess", None)
    raw["build"]["vision"] = {"layout": "shared", "precision": "fp32", "opset": 18}
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(raw))
    m = verify_bundle(bundle_copy)
    assert m.vision.preprocess is None and not m.vision.frame_input
    assert options_from_build(m.build)[0].preprocess == "host"
    write_manifest(bundle_copy, m)  # written back: still version 2, still without the key
    again = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    assert again["schema_version"] == 2 and "preprocess" not in again["vision"]
    assert read_manifest(bundle_copy).vision.preprocess is None
    pipe = Pipeline.load(bundle_copy, threads=1)
    calls = []
    real = Preprocessor.__call__
    monkeypatch.setattr(Preprocessor, "__call__", lambda self, im: calls.append(1) or real(self, im))
    r = pipe.ask(image_bytes_jpeg, "What is it?", tokens=9, max_new_tokens=2)
    assert pipe.preprocess_mode == "host" and calls == [1] and r.budget == 9
    with pytest.raises(ValueError, match="take preprocessed pixels.*--preprocess graph"):
        Pipeline.load(bundle_copy, threads=1, preprocess="graph")


@pytest.fixture(scope="module")
def image_bytes_jpeg(real_images):
    import io

    buf = io.BytesIO()
    real_images[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_frame_size_options_and_flags(tmp_path, capsys):
    from export.cli import export_parser, onnx_main, vision_options

    assert parse_frame_size("1920x1080") == (1920, 1080) and parse_frame_size("640") == (640, 640)
    assert parse_frame_size([1280, 720]) == (1280, 720)
    for bad in ("0x5", "12x", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_frame_size(bad)
    with pytest.raises(ExportError, match="--max-frame"):
        VisionOptions(max_frame="wide")
    with pytest.raises(ExportError, match="--preprocess 'gpu'"):
        VisionOptions(preprocess="gpu")
    args = export_parser().parse_args(["--demo-tiny", "--preprocess", "host", "--max-frame", "1280x720"])
    assert vision_options(args) == VisionOptions(preprocess="host", max_frame=(1280, 720))
    assert VisionOptions(max_frame="1280x720").flags()[-2:] == ["--max-frame", "1280x720"]
    assert "--max-frame" not in VisionOptions(preprocess="host").flags()
    assert onnx_main(["--demo-tiny", "--max-frame", "big", "--out", str(tmp_path / "b")]) == 2
    assert "--max-frame: frame size 'big'" in capsys.readouterr().out and not (tmp_path / "b").exists()
