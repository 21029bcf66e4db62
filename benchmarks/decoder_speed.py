"""The bundle's decoder against this machine's memory-bandwidth bound, and the prefix cache.

    python benchmarks/decoder_speed.py --bundle runs/demo/bundle --threads 2

Measures, interleaved (copy loop, shared-buffer loop, copy, shared, ... so both see the same
machine state), medians over --reps:
- decode: ms per token over --new tokens after a 20-token prompt, with the KV cache moved by a
  per-step copy (`shared_kv = False`, the old loop) and kept in shared past/present buffers;
- prefill of a --prefill-token prompt;
- the bound: the decoder's weight bytes read once per token at the bandwidth a numpy reduction
  over 512 MB reaches here;
- the prefix cache: time to first token of a first question about a frame at 576 tokens, and of
  a follow-up question about the same frame (Pipeline.ask, vision pass included in the first).
Writes benchmarks/results/decoder_speed_<model>.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402


def bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a float32 sum over `mb` MB (a read-only stream, as decoding reads the weights)."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times) / 1e9


def decode_ms(dec, ids, new: int, shared: bool) -> tuple[float, float]:
    """(prefill ms, ms per decoded token) of one greedy generation."""
    from runtime.llm import SamplingParams

    dec.shared_kv = shared
    gen = dec.start(dec.embed(ids), SamplingParams(max_new_tokens=new, stop_token_ids=()))
    for _ in gen:
        pass
    return gen.prefill_ms, gen.decode_ms / max(1, gen.decode_steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="decoded tokens per run")
    p.add_argument("--prefill", type=int, default=600, help="prompt tokens of the prefill measurement")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args(argv)
    from PIL import Image

    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.bundle, threads=args.threads, warmup=True)
    dec, m = pipe.decoder, pipe.manifest
    shared_ok = dec.shared_kv
    rng = np.random.default_rng(0)
    short = rng.integers(100, m.llm.vocab_size - 100, 20)
    long = rng.integers(100, m.llm.vocab_size - 100, args.prefill)
    modes = [False, True] if shared_ok else [False]
    runs: dict[bool, dict[str, list[float]]] = {s: {"decode": [], "prefill": []} for s in modes}
    for s in modes:
        decode_ms(dec, short, 4, s)  # warm-up
    for _ in range(args.reps):
        for s in modes:
            runs[s]["decode"].append(decode_ms(dec, short, args.new, s)[1])
            runs[s]["prefill"].append(decode_ms(dec, long, 1, s)[0])
    dec.shared_kv = shared_ok
    weights = sum((args.bundle / f.path).stat().st_size for f in m.files if f.path.startswith("llm/decoder"))
    gbs = bandwidth_gbs()
    bound_ms = weights / (gbs * 1e9) * 1e3

    # the prefix cache: a first question about a frame, then a follow-up about the same frame
    frame = np.asarray(Image.new("RGB", (640, 480), (90, 140, 200)))
    tokens = max(pipe.budgets)
    first, follow = [], []
    for k in range(args.reps):
        f = frame.copy()
        f[0, 0, 0] = k  # a new frame each rep: the first question always misses
        a = pipe.ask(f, "What is in the picture?", tokens=tokens, max_new_tokens=1)
        b = pipe.ask(f, "What colour is it?", tokens=tokens, max_new_tokens=1)
        assert not a.vision_reused and b.vision_reused  # the follow-up hit the frame's prefix
        first.append(a.measured_ms["ttft"])
        follow.append(b.measured_ms["ttft"])
    med = {s: {k: statistics.median(v) for k, v in r.items()} for s, r in runs.items()}
    res = {
        **run_record(),
        "bundle": str(args.bundle),
        "model": m.model.get("config", {}).get("name", "?"),
        "llm_quant": m.llm.quant,
        "exporter": m.llm.exporter,
        "threads": args.threads,
        "new_tokens": args.new,
        "prefill_tokens": args.prefill,
        "reps": args.reps,
        "decoder_weight_bytes": weights,
        "bandwidth_gbs": round(gbs, 2),
        "bound_ms_per_token": round(bound_ms, 3),
        "copy": {
            "decode_ms_per_token": round(med[False]["decode"], 3),
            "prefill_ms": round(med[False]["prefill"], 1),
        },
        "runs": {("shared" if s else "copy"): r for s, r in runs.items()},
        "prefix_cache": {
            "tokens": tokens,
            "first_ttft_ms": round(statistics.median(first), 1),
            "follow_up_ttft_ms": round(statistics.median(follow), 1),
            "ratio": round(statistics.median(follow) / statistics.median(first), 3),
        },
    }
    if shared_ok:
        res["shared"] = {
            "decode_ms_per_token": round(med[True]["decode"], 3),
            "prefill_ms": round(med[True]["prefill"], 1),
        }
    name = res["model"]
    lines = [
        f"# Decoder speed: `{name}` bundle, {m.llm.quant} ({m.llm.exporter}), {args.threads} threads",
        "",
        f"Command: `{res['command']}`; commit {res['code']['commit']} (dirty: {res['code']['dirty']}).",
        "",
        f"Bound: {weights / 1e6:.0f} MB of decoder weights per token at {gbs:.1f} GB/s (numpy sum over "
        f"512 MB) = {bound_ms:.2f} ms/token ({1e3 / bound_ms:.0f} tok/s). Medians of {args.reps} interleaved runs.",
        "",
        f"| KV cache | decode ms/token | tok/s | of the bound | prefill of {args.prefill} tokens (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in modes:
        d = med[s]["decode"]
        lines.append(
            f"| {'shared past/present buffers' if s else 'copy per step'} | {d:.2f} | {1e3 / d:.0f} | "
            f"{bound_ms / d:.0%} | {med[s]['prefill']:.0f} |"
        )
    pc = res["prefix_cache"]
    lines += [
        "",
        f"Prefix cache at {tokens} tokens: first question TTFT {pc['first_ttft_ms']:.0f} ms (vision + prefill), "
        f"follow-up about the same frame {pc['follow_up_ttft_ms']:.0f} ms ({pc['ratio']:.0%} of the first).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decoder_speed_{name}"
    write_json(stem.with_suffix(".json"), res)
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
