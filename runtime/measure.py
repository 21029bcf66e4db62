"""Measure a latency profile on this device (`python -m runtime profile --bundle B`).

After warm-up: preprocessing time, per budget the vision latency (p50/p90), prefill
latency at each budget's prompt length (a line fitted through them), decode ms/token.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from runtime.llm import SamplingParams
from runtime.profile import Profile, device_info, fit_line, now_iso, percentiles

log = logging.getLogger("runtime")
PROFILE_PROMPT = "Describe the picture in one short sentence."


def synthetic_image(size: int = 480, seed: int = 0) -> Image.Image:
    """A fixed, non-uniform RGB picture: latency does not depend on content, only on shape."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]  # [H, W]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)  # [H, W, 3]
    img = (img + rng.integers(0, 32, img.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def _time(fn: Any, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _prefill_ms(pipe: Any, embeds: np.ndarray) -> float:
    gen = pipe.decoder.start(embeds, SamplingParams(max_new_tokens=1))
    for _ in gen:
        pass
    return gen.prefill_ms


def _decode_ms_per_token(pipe: Any, embeds: np.ndarray, tokens: int) -> float:
    gen = pipe.decoder.start(embeds, SamplingParams(max_new_tokens=tokens))  # no stop tokens
    for _ in gen:
        pass
    return gen.decode_ms / max(1, gen.decode_steps)


def measure(pipe: Any, warmup: int = 2, runs: int = 5, decode_tokens: int = 16, image: Any = None) -> Profile:
    """A Profile of `pipe` (a runtime.pipeline.Pipeline) on this device."""
    image = synthetic_image() if image is None else image
    pre = _time(lambda: pipe.preprocess(image), warmup, runs)
    pixels = pipe.preprocess(image)  # [1, 3, S, S]
    ids = pipe.prompt_ids(PROFILE_PROMPT)
    vision, points, feats = {}, [], {}
    for t in pipe.budgets:
        vision[t] = percentiles(_time(lambda t=t: pipe.vision.encode(pixels, [t]), warmup, runs))
        feats[t] = pipe.vision.encode(pixels, [t])[t][0]  # [T, D]
        log.info("budget %d: vision p50 %.2f ms", t, vision[t]["p50"])
    for t in pipe.budgets:
        embeds = pipe.embeddings(ids, feats[t])  # [1, S, D]
        for _ in range(warmup):
            _prefill_ms(pipe, embeds)
        for _ in range(runs):
            points.append([len(ids) - 1 + t, _prefill_ms(pipe, embeds)])
    intercept, slope = fit_line([(int(n), ms) for n, ms in points])
    embeds = pipe.embeddings(ids, feats[pipe.budgets[-1]])
    _decode_ms_per_token(pipe, embeds, 4)  # warm-up
    decode = float(
        np.median([_decode_ms_per_token(pipe, embeds, decode_tokens) for _ in range(max(1, runs // 2))])
    )
    return Profile(
        device=device_info(pipe.vision.name),
        backend=pipe.vision.name,
        vision_ms=vision,
        prefill_intercept_ms=intercept,
        prefill_ms_per_token=slope,
        decode_ms_per_token=decode,
        preprocess_ms=float(np.median(pre)),
        prefill_points=[[int(n), round(ms, 4)] for n, ms in points],
        created=now_iso(),
    )
