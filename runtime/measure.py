"""Measure a latency profile on this device (`python -m runtime profile --bundle B`).

After warm-up: preprocessing time (a 640x480 JPEG: decode, pad, resize), per budget the vision
latency (p50/p90), prefill latency at each budget's prompt length (a line fitted through them),
decode ms/token.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.llm import SamplingParams
from runtime.profile import Profile, fit_line, now_iso, percentiles

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

log = logging.getLogger("runtime")
PROFILE_PROMPT = "Describe the picture in one short sentence."


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    """A fixed, non-uniform camera-sized frame as JPEG bytes (what a request carries):
    latency depends on the size and format, not on the content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]  # [H, W]
    img = np.stack(
        [x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1
    )  # [H, W, 3]
    img = (img + rng.integers(0, 32, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def time_ms(fn: Any, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def prefill_ms(pipe: Pipeline, embeds: np.ndarray) -> float:
    gen = pipe.decoder.start(embeds, SamplingParams(max_new_tokens=1))
    for _ in gen:
        pass
    return gen.prefill_ms


def decode_ms_per_token(pipe: Pipeline, embeds: np.ndarray, tokens: int) -> float:
    gen = pipe.decoder.start(embeds, SamplingParams(max_new_tokens=tokens))  # no stop tokens
    for _ in gen:
        pass
    return gen.decode_ms / max(1, gen.decode_steps)


def measure(
    pipe: Pipeline, warmup: int = 2, runs: int = 5, decode_tokens: int = 16, image: Any = None
) -> Profile:
    """A Profile of `pipe` (a runtime.pipeline.Pipeline) on this device."""
    image = synthetic_image() if image is None else image
    pre = time_ms(lambda: pipe.prepare(image), warmup, runs)
    pixels = pipe.prepare(image)  # [1, 3, S, S] pixels, or frames [1, H, W, 3] for in-graph preprocessing
    ids = pipe.prompt_ids(PROFILE_PROMPT)
    feats = {t: f[0] for t, f in pipe.vision.encode(pixels, list(pipe.budgets)).items()}  # T -> [T, D]
    embeds = {t: pipe.embeddings(ids, feats[t]) for t in pipe.budgets}  # T -> [1, S, D]
    for _ in range(warmup):
        for t in pipe.budgets:
            pipe.vision.encode(pixels, [t])
            prefill_ms(pipe, embeds[t])
    # Round-robin over budgets, so that a noisy neighbour slows every budget alike.
    vis: dict[int, list[float]] = {t: [] for t in pipe.budgets}
    points = []
    for _ in range(runs):
        for t in pipe.budgets:
            t0 = time.perf_counter()
            pipe.vision.encode(pixels, [t])
            vis[t].append((time.perf_counter() - t0) * 1e3)
            points.append([len(ids) - 1 + t, prefill_ms(pipe, embeds[t])])
    vision = {t: percentiles(v) for t, v in vis.items()}
    intercept, slope = fit_line([(int(n), ms) for n, ms in points])
    small = embeds[pipe.budgets[-1]]
    decode_ms_per_token(pipe, small, 4)  # warm-up
    decode = float(
        np.median([decode_ms_per_token(pipe, small, decode_tokens) for _ in range(max(1, runs // 2))])
    )
    return Profile(
        device=dict(pipe.device),  # device_info(provider) from Pipeline.__init__
        backend=pipe.vision.name,
        vision_ms=vision,
        prefill_intercept_ms=intercept,
        prefill_ms_per_token=slope,
        decode_ms_per_token=decode,
        preprocess_ms=float(np.median(pre)),
        prefill_points=[[int(n), round(ms, 4)] for n, ms in points],
        created=now_iso(),
    )
