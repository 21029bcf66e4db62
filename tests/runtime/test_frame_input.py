"""The runtime with a frame-input bundle (the default export): numpy frames go straight into the
vision graph (no PIL), files are decoded without resizing, the PIL path stays as the exact option,
bad frames are refused saying what to do, and `runtime latency` compares the two."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fmvr.frames import Frame, FrameError
from fmvr.preprocess import ImageError, Preprocessor

PROMPT = "What is in the picture?"
# Graph vs PIL preprocessing, tiny model, the real photos: visual-token cosine >= 0.99999998 at
# every budget (measured); the bound, 10x looser:
COSINE = 0.9999998
FIT_COSINE = 0.999  # downscaled to fit, then the graph's resize: two resamplings instead of one


@pytest.fixture(scope="module")
def host_pipe(tiny_bundle):
    """The same bundle with preprocess="host": fmvr.preprocess's pad + resize on the host."""
    from runtime.pipeline import Pipeline

    return Pipeline.load(tiny_bundle, threads=1, preprocess="host")


@pytest.fixture(scope="module")
def photo(real_images) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(real_images[0])[:360, :640])  # uint8 [360, 640, 3], 16:9


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_tiny_bundle_takes_frames(pipe):
    assert pipe.manifest.vision.frame_input and pipe.preprocess_mode == "graph"
    assert pipe.vision.input_name == "frames"


def test_a_numpy_frame_goes_straight_into_the_graph(pipe, photo, tmp_path, monkeypatch):
    """No PIL call for a numpy frame; its answer and visual tokens equal those of the same image
    read from a (lossless) file."""
    import fmvr.preprocess as fp

    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    from_file = pipe.ask(path, PROMPT, tokens=36, max_new_tokens=8)
    file_feats = pipe.encode(path, [36, 1]).features

    def no_pil(*a, **kw):
        raise AssertionError("PIL was called for a numpy frame")

    for owner, name in [(fp, "load_image"), (fp, "preprocess"), (fp, "square_resized"), (Image, "fromarray")]:
        monkeypatch.setattr(owner, name, no_pil)
    monkeypatch.setattr(Preprocessor, "__call__", no_pil)
    monkeypatch.setattr(Image.Image, "resize", no_pil)
    assert pipe.prepare(photo).shape == (1, 360, 640, 3)
    r = pipe.ask(photo, PROMPT, tokens=36, max_new_tokens=8)
    assert r.token_ids == from_file.token_ids and r.answer == from_file.answer
    feats = pipe.encode(photo, [36, 1]).features
    for t in (36, 1):
        np.testing.assert_array_equal(feats[t], file_feats[t])
    bgr = pipe.encode(Frame.from_array(photo[:, :, ::-1], order="bgr"), [36]).features[36]
    np.testing.assert_array_equal(bgr, feats[36])  # an OpenCV frame: channels swapped, no PIL


def test_graph_and_host_preprocessing_agree(pipe, host_pipe, photo, real_images):
    """The exact option (PIL pad + resize on the host, fed as a frame) vs frames at their own size."""
    assert host_pipe.preprocess_mode == "host" and host_pipe.prepare(photo).shape == (1, 336, 336, 3)
    for image in (photo, real_images[1]):
        g = pipe.encode(image, list(pipe.budgets)).features
        h = host_pipe.encode(image, list(pipe.budgets)).features
        for t in pipe.budgets:
            assert cosine(g[t], h[t]) >= COSINE, t
    r = host_pipe.ask(photo, PROMPT, tokens=9, max_new_tokens=6)
    assert r.token_ids == pipe.ask(photo, PROMPT, tokens=9, max_new_tokens=6).token_ids


def test_a_frame_over_the_declared_maximum_is_downscaled_and_answered(pipe, host_pipe, photo):
    """4000x40 (a banner) and 1930 px tall: fit on the host (aspect kept), then the graph; the
    visual tokens agree with the exact host path (PIL pad + resize from the original)."""
    from runtime.frame_input import fit

    spec = pipe.manifest.vision.preprocess
    banner = np.ascontiguousarray(np.tile(photo[:40, :, :], (1, 7, 1))[:, :4000])  # [40, 4000, 3]
    assert fit(banner, spec).shape == (19, 1920, 3) and fit(photo, spec) is photo
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.tile(photo, (6, 1, 1))[:1930, :4])).save(buf, format="PNG")
    for image in (banner, buf.getvalue()):
        g = pipe.encode(image, list(pipe.budgets)).features
        h = host_pipe.encode(image, list(pipe.budgets)).features
        for t in pipe.budgets:
            assert cosine(g[t], h[t]) >= FIT_COSINE, t
        r = pipe.ask(image, PROMPT, tokens=9, max_new_tokens=6)
        assert r.token_ids == host_pipe.ask(image, PROMPT, tokens=9, max_new_tokens=6).token_ids


def test_bad_frames_say_what_was_wrong_and_what_to_do(pipe, host_pipe):
    with pytest.raises(ImageError, match="frame dtype float32: pass uint8 pixels"):
        pipe.ask(np.zeros((8, 8, 3), np.float32), PROMPT, tokens=1)
    with pytest.raises(ImageError, match=r"frame shape \(8, 8, 5\)"):
        pipe.ask(np.zeros((8, 8, 5), np.uint8), PROMPT, tokens=1)
    # the backend's own contract, for callers that skip the pipeline
    with pytest.raises(FrameError, match="dtype float32: this bundle's vision graph takes uint8 RGB frames"):
        pipe.vision.encode(np.zeros((1, 3, 336, 336), np.float32), [36])
    with pytest.raises(FrameError, match=r"shape \[1, 3, 336, 336\]: expected \[B, H, W, 3\]"):
        pipe.vision.encode(np.zeros((1, 3, 336, 336), np.uint8), [36])
    with pytest.raises(FrameError, match="2000x10 .* exceeds"):
        pipe.vision.encode(np.zeros((1, 10, 2000, 3), np.uint8), [36])
    with pytest.raises(ValueError, match="preprocess 'cpu': choose one of auto, graph, host"):
        type(pipe).load(pipe.bundle_dir, preprocess="cpu")


def test_in_graph_pixels_are_exposed_for_checks(pipe, photo):
    pixels = pipe.vision.pixels(pipe.prepare(photo))  # [1, 3, S, S] float32, the graph's own
    ref = pipe.preprocess(photo)
    grey = np.abs(pixels - ref) * np.asarray(pipe.preprocessor.std, np.float32)[:, None, None] * 255
    assert pixels.shape == ref.shape and grey.mean() <= 0.002 and grey.max() <= 1.001


def test_bench_compares_host_and_graph_preprocessing(pipe):
    from runtime.tools.latency import preprocess_comparison, preprocess_markdown

    rep = preprocess_comparison(pipe, runs=1)
    assert rep["budget"] == 36 and pipe.preprocess_mode == "graph"  # restored afterwards
    assert [(r["input"].split()[0], r["preprocess"]) for r in rep["rows"]] == [
        ("jpeg", "host"),
        ("jpeg", "graph"),
        ("frame", "host"),
        ("frame", "graph"),
    ]
    assert all(r["host_ms"] >= 0 and r["in_graph_ms"] >= 0 and r["ttft_36_ms"] > 0 for r in rep["rows"])
    text = "\n".join(preprocess_markdown(rep))
    assert "| frame 1280x720 (numpy) | graph |" in text and "TTFT 36 ms" in text
