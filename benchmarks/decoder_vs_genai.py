"""Our decoder loop (runtime.llm) against onnxruntime-genai's, on the same weights, in one run.

    python benchmarks/decoder_vs_genai.py --quant int8 --threads 2            # the small preset's LM
    python benchmarks/decoder_vs_genai.py --checkpoint runs/demo/train/final --quant int4

Both decoders come out of onnxruntime-genai's model builder from one LM (the checkpoint's, or
the `small` preset's SmolLM2-135M-Instruct) and are quantized by the same export.quant recipe,
so they run the same MatMulNBits weights with the same kernels. They differ in what we own: ours
takes inputs_embeds (the embedding lookup is a numpy gather on the host, as a VLM needs), runs the
LM head on the last position only (export.decoder.last_logits_only, as our bundles do) and runs
our Python loop over IO binding with shared past/present buffers; genai's graph embeds the ids
itself, computes every position's logits, and runs genai's C++ loop. A greedy continuation of one prompt checks they are the same
model (the tokens both produce).

Each measurement runs in a fresh worker process (so its peak RSS is its own), alternating
ours, genai, ours, genai ... --reps times; medians. Per engine: decode ms/token over --new
tokens after a 20-token prompt, prefill of a --prefill-token prompt, RSS after loading and peak.
The memory-bandwidth bound: the decoder's weight bytes once per token at the bandwidth a numpy
reduction over 512 MB reaches here (benchmarks/decoder_speed.py's). Writes
benchmarks/results/decoder_vs_genai_<quant>.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("ours", "genai")
CHECK_TOKENS = 24  # greedy tokens compared between the two


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB: /proc's VmRSS and VmHWM (getrusage's
    ru_maxrss would carry the parent's peak across fork + exec)."""
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return float(status["VmRSS"].split()[0]) / 1024, float(status["VmHWM"].split()[0]) / 1024


# ---- building the two decoders (torch; once, cached in --work) ------------------------------------


def build(args: argparse.Namespace) -> dict:
    """Both decoders of one LM under args.work/<quant>/{ours,genai}; returns the spec ours needs."""
    spec_path = args.work / args.quant / "spec.json"
    if spec_path.is_file():
        return json.loads(spec_path.read_text())
    import torch

    from export.decoder import export_genai, last_logits_only, load_model, save_model
    from export.quant import quantization
    from fmvr.atomic import write_json

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from fmvr.checkpoint import load_checkpoint
        from fmvr.tokenizer import load_tokenizer

        model, tok, source = (
            load_checkpoint(args.checkpoint).eval(),
            load_tokenizer(args.checkpoint),
            str(args.checkpoint),
        )
    else:
        from fmvr.config import preset
        from fmvr.model import build_model
        from fmvr.tokenizer import preset_tokenizer

        cfg = preset("small")
        model, tok, source = (
            build_model(cfg).eval(),
            preset_tokenizer(cfg),
            "the small preset (SmolLM2-135M-Instruct)",
        )
    q = quantization(args.quant)
    root = args.work / args.quant
    for engine, embeds in (("ours", True), ("genai", False)):
        work = root / f"{engine}.work"
        final = root / engine / "model.onnx"
        export_genai(
            model.language_model, tok, final, "fp32", "cpu", work, args.block_size, exclude_embeds=embeds
        )
        onnx_model = load_model(final)
        if engine == "ours":  # as export.decoder.make_decoder: the head on the last position only
            assert last_logits_only(onnx_model)
        if q.quantize is not None:
            onnx_model = q.quantize(onnx_model, args.block_size, "cpu")
        save_model(onnx_model, final)
        if engine == "genai":  # genai reads its config and tokenizer beside the graph
            config = json.loads((work / "genai" / "genai_config.json").read_text())
            config["model"]["decoder"]["filename"] = final.name
            config["model"]["decoder"]["session_options"] = {"intra_op_num_threads": args.threads}
            (root / engine / "genai_config.json").write_text(json.dumps(config, indent=1))
        shutil.rmtree(work)
    table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
    np.save(root / "ours" / "embed.npy", table)
    t = model.cfg.text
    spec = {
        "source": source, "quant": args.quant, "method": q.method,
        "num_layers": t.num_layers, "num_kv_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "hidden_size": t.hidden_size, "vocab_size": t.vocab_size, "max_len": t.max_position_embeddings,
        "weight_bytes": (root / "ours" / "model.onnx.data").stat().st_size,
    }  # fmt: skip
    write_json(spec_path, spec)
    return spec


# ---- the workers (no torch) ---------------------------------------------------------------------------


def ours_session(root: Path, spec: dict, threads: int):
    import onnxruntime as ort

    from runtime.bundle import LLMSection
    from runtime.llm import Decoder

    section = LLMSection(decoder="model.onnx", embed_tokens="embed.npy", num_layers=spec["num_layers"],
                         num_kv_heads=spec["num_kv_heads"], head_dim=spec["head_dim"],
                         hidden_size=spec["hidden_size"], vocab_size=spec["vocab_size"], quant=spec["quant"],
                         exporter="onnxruntime-genai")  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(root / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    table = np.load(root / "embed.npy", mmap_mode="r")
    return Decoder(session, section, table, spec["max_len"], kv_cache_mb=0)


def ours_run(dec, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """(prefill ms, decode ms per token, tokens) of one greedy generation."""
    from runtime.llm import SamplingParams

    gen = dec.start(dec.embed(ids), SamplingParams(max_new_tokens=new))
    tokens = list(gen)
    return gen.prefill_ms, gen.decode_ms / max(1, gen.decode_steps), tokens


def genai_run(model, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """(prefill ms, decode ms per token, tokens) of one greedy generation, genai's loop."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False, min_length=len(ids) + new)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids.astype(np.int32))  # the prompt's forward pass
    prefill = (time.perf_counter() - t0) * 1e3
    gen.generate_next_token()  # the first token, from the prefill's logits (no forward pass)
    tokens = [int(gen.get_next_tokens()[0])]
    t0 = time.perf_counter()
    for _ in range(new - 1):  # each: a forward pass on the last token, then the pick (as ours)
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return prefill, (time.perf_counter() - t0) * 1e3 / max(1, new - 1), tokens


def worker(args: argparse.Namespace) -> int:
    spec = json.loads((args.work / args.quant / "spec.json").read_text())
    root = args.work / args.quant / args.worker
    rng = np.random.default_rng(0)
    short = rng.integers(100, spec["vocab_size"] - 100, 20)
    long = rng.integers(100, spec["vocab_size"] - 100, args.prefill)
    if args.worker == "ours":
        dec = ours_session(root, spec, args.threads)

        def run(ids, new):
            return ours_run(dec, ids, new)
    else:
        import onnxruntime_genai as og

        model = og.Model(str(root))

        def run(ids, new):
            return genai_run(model, ids, new)

    loaded = rss_mb()[0]
    run(short, 4)  # warm-up
    _, decode, tokens = run(short, args.new)
    prefill, _, _ = run(long, 2)
    rss, peak = rss_mb()
    print(json.dumps({"decode_ms": decode, "prefill_ms": prefill, "rss_loaded_mb": loaded, "rss_mb": rss,
                      "peak_rss_mb": peak, "tokens": tokens[:CHECK_TOKENS]}))  # fmt: skip
    return 0


# ---- the run ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="an FMVR checkpoint (default: the small preset's LM)")
    p.add_argument("--quant", default="int8", help="an export --quant row (int8, int4, fp32, ...)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="decoded tokens per run")
    p.add_argument("--prefill", type=int, default=600, help="prompt tokens of the prefill measurement")
    p.add_argument("--reps", type=int, default=5, help="worker runs per engine, alternating")
    p.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "decoder_vs_genai", help="built decoders (cached)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    from benchmarks.decoder_speed import bandwidth_gbs
    from fmvr.atomic import write_json, write_text
    from fmvr.provenance import run_record

    spec = build(args)
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--quant", args.quant, "--threads", str(args.threads),
           "--new", str(args.new), "--prefill", str(args.prefill), "--work", str(args.work)]  # fmt: skip
    for rep in range(args.reps):
        for engine in ENGINES:
            out = subprocess.run([*cmd, "--worker", engine], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"the {engine} worker failed:\n{out.stderr[-3000:]}")
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {engine}: {runs[engine][-1]['decode_ms']:.2f} ms/token", flush=True)
    gbs = bandwidth_gbs()
    bound_ms = spec["weight_bytes"] / (gbs * 1e9) * 1e3
    keys = ("decode_ms", "prefill_ms", "rss_loaded_mb", "peak_rss_mb")
    med = {e: {k: statistics.median(r[k] for r in runs[e]) for k in keys} for e in ENGINES}
    same = [a == b for a, b in zip(runs["ours"][0]["tokens"], runs["genai"][0]["tokens"])]
    res = {
        **run_record(), "source": spec["source"], "quant": args.quant, "method": spec["method"],
        "threads": args.threads, "new_tokens": args.new, "prefill_tokens": args.prefill, "reps": args.reps,
        "decoder_weight_bytes": spec["weight_bytes"], "bandwidth_gbs": round(gbs, 2),
        "bound_ms_per_token": round(bound_ms, 3), "greedy_tokens_equal": f"{sum(same)}/{len(same)}",
        "median": {e: {k: round(v, 2) for k, v in m.items()} for e, m in med.items()}, "runs": runs,
    }  # fmt: skip
    lines = [
        f"# Our decoder against onnxruntime-genai: {args.quant}, {args.threads} threads",
        "",
        f"Command: `{res['command']}`; commit {res['code']['commit']} (dirty: {res['code']['dirty']}).",
        "",
        f"Weights: {spec['source']}, {spec['method']}; {spec['weight_bytes'] / 1e6:.0f} MB of decoder "
        f"weights per token at {gbs:.1f} GB/s (numpy sum over 512 MB) = {bound_ms:.2f} ms/token "
        f"({1e3 / bound_ms:.0f} tok/s). Medians of {args.reps} alternating runs, each a fresh process. "
        f"Greedy tokens equal: {res['greedy_tokens_equal']}.",
        "",
        "| decoder | decode ms/token | tok/s | of the bound | prefill of "
        f"{args.prefill} tokens (ms) | RSS loaded (MB) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "ours": "ours (runtime.llm, inputs_embeds)",
        "genai": f"onnxruntime-genai {genai_version()} (input_ids)",
    }
    for e in ENGINES:
        m = med[e]
        lines.append(f"| {names[e]} | {m['decode_ms']:.2f} | {1e3 / m['decode_ms']:.0f} | "
                     f"{bound_ms / m['decode_ms']:.0%} | {m['prefill_ms']:.0f} | {m['rss_loaded_mb']:.0f} | "
                     f"{m['peak_rss_mb']:.0f} |")  # fmt: skip
    name = f"decoder_vs_genai_{args.quant}"
    write_json(args.out / f"{name}.json", res, indent=1)
    write_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def genai_version() -> str:
    try:
        import onnxruntime_genai as og

        return og.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
