"""Several frames per request: one batched vision pass vs N single passes, on this device.

    python -m runtime.tools.batching --bundle B [--frames 1,2,4,6] [--runs 10] [--tokens 36] [--size 640x480]
                               [--threads 1] [--preprocess auto|graph|host]

For each N: the median ms of the vision pass for N same-size camera frames as one batch
(runtime.images.encode_images, what a request does) and as N calls of one frame each, and the
median TTFT of a whole N-frame request at `--tokens` per frame. Frames of different sizes under
in-graph preprocessing cannot share a batch (one call per size): the "mixed sizes" row shows it.
Prints a Markdown table; with --json, the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.frame_input import PREPROCESS
from runtime.images import encode_images
from runtime.measure import time_ms

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

PROMPT = "What changed between the frames?"


def camera_frames(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """`n` distinct uint8 RGB frames [height, width, 3] (content does not change the timings)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def batching(pipe: Pipeline, ns: list[int], runs: int, tokens: int, width: int, height: int) -> list[dict]:
    """One row per N (and a mixed-size row at the largest N): batched and single ms, TTFT."""
    xs = [pipe.prepare(f) for f in camera_frames(max(ns), width, height)]  # [1, ...] each
    rows = [_row(pipe, xs[:n], tokens, runs, f"{n} x {width}x{height}") for n in ns]
    n = max(ns)
    sizes = [(height - 8 * i, width - 8 * i) for i in range(n)]  # a size each: a call each
    mixed = [pipe.prepare(f) for (h, w) in sizes for f in camera_frames(1, w, h)]
    rows.append(_row(pipe, mixed, tokens, runs, f"{n} mixed sizes"))
    return rows


def _row(pipe: Pipeline, xs: list[np.ndarray], tokens: int, runs: int, name: str) -> dict[str, Any]:
    ts = [tokens] * len(xs)
    _, calls = encode_images(pipe.vision, xs, ts)
    batched = statistics.median(time_ms(lambda: encode_images(pipe.vision, xs, ts), 2, runs))
    single = statistics.median(time_ms(lambda: [pipe.vision.encode(x, [tokens]) for x in xs], 2, runs))
    frames = [x[0] for x in xs] if pipe.manifest.vision.frame_input else None
    ttft = None
    if frames is not None:
        rs = [pipe.ask(frames, PROMPT, tokens=tokens, max_new_tokens=1) for _ in range(runs + 1)][1:]
        ttft = statistics.median(r.measured_ms["ttft"] for r in rs)
    return {
        "frames": name,
        "n": len(xs),
        "calls": calls,
        "batched_ms": round(batched, 2),
        "single_ms": round(single, 2),
        "batched_over_single": round(batched / single, 3),
        f"ttft_{tokens}_ms": None if ttft is None else round(ttft, 2),
    }


def to_markdown(rows: list[dict], tokens: int, backend: str, threads: int | None = None) -> str:
    how = "" if threads is None else f", {threads or 'default'} thread(s)"
    lines = [
        f"Vision pass at {tokens} tokens per frame, backend {backend}{how}; median ms",
        "",
        f"| frames | calls | batched ms | N single ms | batched / single | TTFT ms ({tokens}/frame) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ttft = r[f"ttft_{tokens}_ms"]
        lines.append(
            f"| {r['frames']} | {r['calls']} | {r['batched_ms']:.2f} | {r['single_ms']:.2f} "
            f"| {r['batched_over_single']:.2f} | {'-' if ttft is None else f'{ttft:.1f}'} |"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT such as 640x480") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.tools.batching", description=__doc__)
    ap.add_argument("--bundle", required=True, help="bundle directory")
    ap.add_argument("--backend", default="auto", help="vision backend (as `runtime ask --backend`)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument(
        "--preprocess", default="auto", choices=PREPROCESS, help="as `runtime ask --preprocess` (host: S x S)"
    )
    ap.add_argument("--frames", default="1,2,4,6", help="comma-separated frame counts N")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median)")
    ap.add_argument("--tokens", type=int, default=36, help="visual-token budget of every frame")
    ap.add_argument("--size", type=_size, default=(640, 480), help="frame WIDTHxHEIGHT")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(  # no prefix cache: the same frames are timed again and again
        args.bundle,
        backend=args.backend,
        threads=args.threads,
        warmup=True,
        preprocess=args.preprocess,
        prefix_cache_mb=0,
    )
    ns = [int(n) for n in args.frames.split(",")]
    rows = batching(pipe, ns, args.runs, pipe.check_budget(args.tokens), *args.size)
    print(
        json.dumps(rows, indent=2)
        if args.json
        else to_markdown(rows, args.tokens, pipe.vision.name, args.threads)
    )
    ask = f"python -m runtime ask --bundle {args.bundle} --image A.jpg --image B.jpg --prompt '...'"
    print(f"next: {ask} --latency-ms 80")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
