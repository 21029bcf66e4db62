"""`python -m runtime ask|profile|serve|bench|card`: the torch-free runtime's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fmvr.video import COLLAGE_FRAMES, VIDEO_MODES
from runtime.frame_input import PREPROCESS
from runtime.options import OBJECTIVES, AskOptions, OptionsError
from runtime.prefix_cache import DEFAULT_MB
from runtime.tools.card import add_arguments as add_card_arguments
from runtime.vision import BACKENDS

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

# Old spellings that keep working for one release (rewritten with a FutureWarning).
DEFAULTS = AskOptions()  # one set of defaults for the CLI, the server and the Python API


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (made by `python -m export`)")
    p.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="vision backend (auto: from manifest + device)"
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument(
        "--preprocess",
        default="auto",
        choices=PREPROCESS,
        help="auto: as the bundle's graphs do; graph: frames straight into a frame-input graph; "
        "host: fmvr.preprocess (PIL) pad + resize first, the exact path",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=DEFAULT_MB,
        help="ask/serve: keep a frame's prompt prefix (up to its visual tokens) for follow-up questions "
        f"about it, at most this many MB (default {DEFAULT_MB}; 0: off). The timing commands never use it",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        default=None,
        help="KV memory budget of the requests running at once (default: the manifest's llm.kv_cache_mb; "
        "0: no limit). A request over it alone is refused; one that would fit later gets a 503 (serve)",
    )
    p.add_argument("--verbose", action="store_true", help="log the backend choice and profile notes")


def _tokens(text: str) -> int | list[int]:
    """--tokens 36 (every image) or --tokens 9,9,144 (one per image, in order)."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a budget such as 36, or one per image such as 9,144"
        ) from None
    return values if "," in text else values[0]


def _budget_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated budgets such as 9,144") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about images or a video within a latency budget")
    _common(a)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--image", action="append", help="image file (jpg/png/...); repeat for several, oldest first"
    )
    src.add_argument("--video", help="video file (GIF, animated WebP, APNG; others need imageio)")
    a.add_argument("--frames", type=int, help=f"--video: frames sampled uniformly (default {COLLAGE_FRAMES})")
    a.add_argument(
        "--video-mode",
        choices=VIDEO_MODES,
        help="--video: frames (default): an image and a budget each; collage: one 2-per-row image",
    )
    a.add_argument("--prompt", required=True, help="the question about the image(s)")
    a.add_argument(
        "--latency-ms", type=float, nargs="+", help="latency budget(s) in ms; several: one answer each"
    )
    a.add_argument(
        "--tokens",
        type=_tokens,
        help="force a visual-token budget (skips the policy): one for every image, or one per image (9,144)",
    )
    a.add_argument(
        "--objective", choices=OBJECTIVES, default=DEFAULTS.objective, help="what must fit the latency budget"
    )
    a.add_argument("--strict", action="store_true", help="fail instead of missing the latency budget")
    a.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="answer length limit")
    a.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 = greedy")
    a.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling mass")
    a.add_argument("--seed", type=int, help="sampling seed")
    a.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    a.add_argument("--timeout-s", type=float, help="stop decoding after this many seconds (exit 1)")
    a.add_argument(
        "--escalate",
        type=_budget_list,
        help="comma-separated budgets, e.g. 9,144: one vision pass, one answer each",
    )
    a.add_argument(
        "--profile-if-missing", action="store_true", help="measure this device's profile on first use"
    )
    a.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    a.add_argument("--json", action="store_true", help="print the full result(s) as JSON")
    p = sub.add_parser("profile", help="measure this device's latency per budget; saved in the bundle")
    _common(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement")
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _common(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    s.add_argument("--max-concurrency", type=int, default=2, help="requests running at once")
    s.add_argument("--max-queue", type=int, default=8, help="requests waiting; more get 429")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="request size limit (413 past it)")
    s.add_argument("--timeout-s", type=float, default=120.0, help="per-request time limit (504 past it)")
    s.add_argument(
        "--queue-timeout-s",
        type=float,
        default=30.0,
        help="longest wait for a slot in the queue (503 past it)",
    )
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    s.add_argument(
        "--profile-if-missing", action="store_true", help="measure the profile at startup if absent"
    )
    b = sub.add_parser("latency", help="TTFT per budget vs FLOPs, and the policy under load")
    _common(b)
    b.add_argument(
        "--out",
        default="",
        help="where latency.{json,md,png} go (default: BUNDLE/latency, beside the profile)",
    )
    b.add_argument("--runs", type=int, default=5, help="timed runs per budget")
    b.add_argument("--requests", type=int, default=40, help="requests in the policy-under-load run")
    b.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="parallel clients in the load runs (one run each)",
    )
    c = sub.add_parser("card", help="this device's budget card: p50/p95 ms per stage, accuracy per category")
    _common(c)
    add_card_arguments(c)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    if args.cmd == "ask":  # every flag checked before the bundle loads
        try:
            args.options = ask_options(args)
        except OptionsError as e:
            ap.error(f"--{e.field.replace('_', '-')} {e.problem}")
        try:  # the video is read and sampled before the bundle loads, too
            args.inputs = _inputs(args)
        except ValueError as e:  # fmvr.video.VideoError: unreadable, or no reader for the container
            print(f"error: {e}", file=sys.stderr)
            return 2
    from runtime.bundle import BundleError
    from runtime.llm import GenerationTimeout
    from runtime.pipeline import Pipeline
    from runtime.policy import DeadlineError

    try:
        pipe = Pipeline.load(
            args.bundle,
            backend=args.backend,
            threads=args.threads,
            profile_if_missing=getattr(args, "profile_if_missing", False),
            warmup=args.cmd != "profile",
            preprocess=args.preprocess,
            prefix_cache_mb=args.prefix_cache_mb if args.cmd in ("ask", "serve") else 0,
            kv_cache_mb=args.kv_cache_mb,
        )
        commands = {"ask": _ask, "profile": _profile, "serve": _serve, "latency": _latency, "card": _card}
        return commands[args.cmd](pipe, args)
    except (BundleError, ValueError) as e:  # ProfileError, OptionsError and ImageError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DeadlineError, GenerationTimeout) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def ask_options(args: argparse.Namespace) -> list[AskOptions]:
    """The AskOptions of `runtime ask`'s flags: one per --latency-ms value (one if none)."""
    if args.escalate and (args.latency_ms or args.tokens is not None or args.strict):
        raise OptionsError(
            "escalate", "answers at the budgets it lists: drop --latency-ms, --tokens, --strict"
        )
    if args.escalate and (args.video or len(args.image) > 1):
        raise OptionsError("escalate", "answers about one image: give one --image and no --video")
    for name in ("frames", "video_mode"):
        if getattr(args, name) is not None and not args.video:
            raise OptionsError(name, "applies to --video only")
    if args.frames is not None and args.frames < 1:
        raise OptionsError("frames", f"must be >= 1, got {args.frames}")
    common = dict(
        tokens=args.tokens,
        objective=args.objective,
        strict=args.strict,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        timeout_s=args.timeout_s,
    )
    return [AskOptions(latency_ms=lat, **common) for lat in args.latency_ms or [None]]


def _inputs(args: argparse.Namespace) -> tuple[list[object], str]:
    """The images and the prompt of `runtime ask`: the --image files, or --video sampled."""
    if args.video:
        from fmvr.video import read_video, video_images

        n = args.frames or COLLAGE_FRAMES
        frames = read_video(args.video, n)  # oldest first
        return video_images(frames, args.prompt, n, args.video_mode or "frames")
    return [Path(p).read_bytes() if Path(p).is_file() else p for p in args.image], args.prompt


def _ask(pipe: Pipeline, args: argparse.Namespace) -> int:
    images, prompt = args.inputs
    if args.escalate:
        results = pipe.escalate(images[0], prompt, args.escalate, args.options[0])
    else:
        results = []
        for opts in args.options:
            ans = pipe.stream(images, prompt, opts)
            for delta in ans:
                if args.stream and not args.json:
                    print(delta, end="", flush=True)
            if args.stream and not args.json:
                print()
            results.append(ans.result)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    print(f"vision backend: {pipe.vision.name}, LLM: {pipe.decoder.provider}, {pipe.profile_note}")
    for r in results:
        _print_result(r)
    print(f"next: python -m runtime serve --bundle {args.bundle}")
    return 0


def _print_result(r) -> None:  # type: ignore[no-untyped-def]
    lat = "none" if r.latency_ms is None else f"{r.latency_ms:g} ms"
    met = {None: "-", True: "met", False: "MISSED"}[r.deadline_met]
    key = "total" if r.objective == "total" else "ttft"
    pred = r.predicted_ms.get(key)
    pred_s = "-" if pred is None else f"{pred:.1f}"
    per_image = f" (per image, newest last: {', '.join(map(str, r.budgets))})" if len(r.budgets) > 1 else ""
    print(f"[latency budget {lat}] -> {r.budget} visual tokens{per_image} ({r.reason})")
    if r.candidates_ms:
        cands = ", ".join(f"{t}: {ms:.1f}" for t, ms in r.candidates_ms.items())
        print(f"  predicted {r.objective} per budget (ms): {cands}")
    print(f"  {key}: predicted {pred_s} ms, measured {r.measured_ms[key]:.1f} ms, deadline {met}")
    stages = ", ".join(f"{s} {r.measured_ms[s]:.1f}" for s in ("preprocess", "vision", "prefill", "decode"))
    print(f"  stages (ms): {stages}; {len(r.token_ids)} tokens, finish {r.finish_reason}")
    print(f"  answer: {r.answer!r}")


def _profile(pipe: Pipeline, args: argparse.Namespace) -> int:
    from runtime.profile import profile_path

    prof = pipe.measure_profile(warmup=args.warmup, runs=args.runs)
    print(f"device {prof.key}: backend {prof.backend}")
    print("budget  vision p50 ms  p90 ms  prefill ms (predicted)")
    for t in pipe.budgets:
        v = prof.vision_ms[t]
        print(f"{t:>6}  {v['p50']:>12.2f}  {v['p90']:>6.2f}  {prof.prefill(t + 40):>10.2f}")
    print(
        f"prefill: {prof.prefill_intercept_ms:.2f} ms + {prof.prefill_ms_per_token:.4f} ms/token; "
        f"decode {prof.decode_ms_per_token:.2f} ms/token"
    )
    print(f"saved {profile_path(pipe.bundle_dir, prof.device)}")
    print(f"next: python -m runtime ask --bundle {args.bundle} --image IMG --prompt '...' --latency-ms 50")
    return 0


def _serve(pipe: Pipeline, args: argparse.Namespace) -> int:
    try:
        from runtime.serve.server import ServerConfig, make_server
    except ImportError as e:  # the serve extra is not installed: say how to get it
        print(f"error: {e}", file=sys.stderr)
        return 2
    if pipe.policy is None and args.profile_if_missing:
        pipe.measure_profile()
    cfg = ServerConfig(
        host=args.host,
        port=args.port,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        timeout_s=args.timeout_s,
        queue_timeout_s=args.queue_timeout_s,
        allow_remote_images=args.allow_remote_images,
    )
    srv = make_server(pipe, cfg)
    print(f"serving {srv.model} on {srv.url} (vision {pipe.vision.name}; {pipe.profile_note})")
    print(f"try: curl {srv.url}/health")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def _latency(pipe: Pipeline, args: argparse.Namespace) -> int:
    from runtime.tools.latency import run_latency

    out = Path(args.out) if args.out else Path(pipe.bundle_dir) / "latency"
    run_latency(pipe, out, runs=args.runs, requests=args.requests, concurrency=args.concurrency)
    return 0


def _card(pipe: Pipeline, args: argparse.Namespace) -> int:
    from runtime.tools.card import run

    return run(pipe, args)


if __name__ == "__main__":
    raise SystemExit(main())
