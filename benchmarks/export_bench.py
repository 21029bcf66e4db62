"""Export benchmark: ONNX Runtime CPU latency of the vision graph per budget (FMVR vs M3 vs none),
and what the shared layout saves (bytes on disk, resident memory to hold all five budgets).

    .venv/bin/python benchmarks/export_bench.py [--runs 30] [--threads 1]

Writes benchmarks/results/export_bench_<scale>.{json,md,png} (--scale tiny | small). CPU only: the GPU parts of the issue
(onnxruntime CUDA fp16 latency, TensorRT build time and latency) need an NVIDIA GPU and
are not measured here; `python -m export.trt` records them in each engine's sidecar.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
PYRAMIDS = ("fmvr", "m3", "none")


def bench_config(scale: str, pyramid: str):
    """tiny: the tiny preset. small: 4x wider, 2x deeper tower (the pyramid's share shrinks ~8x)."""
    from fmvr.config import TextConfig, VisionConfig, preset

    cfg = preset("tiny", pyramid=pyramid)
    if scale == "small":
        vision = VisionConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=1024)
        text = TextConfig(
            hidden_size=512,
            num_layers=1,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1024,
            vocab_size=cfg.text.vocab_size,
            max_position_embeddings=1024,
        )
        cfg = cfg.replace(name="small", vision=vision, text=text)
    return cfg


def export_variants(work: Path, scale: str, fp16: bool = False) -> dict[str, dict[int, Path]]:
    """Per pyramid, one single-output graph per budget (pruned from one shared export)."""
    import onnx.utils

    from export.graphs import export_graph
    from export.options import VisionOptions
    from fmvr.model import build_model

    graphs: dict[str, dict[int, Path]] = {}
    for kind in PYRAMIDS:
        model = build_model(bench_config(scale, kind), seed=0)
        budgets = tuple(model.cfg.budgets)
        shared = work / f"{kind}-all.onnx"
        export_graph(model, budgets, shared, VisionOptions(precision="fp16" if fp16 else "fp32", opset=18))
        graphs[kind] = {}
        for t in budgets:
            one = work / f"{kind}-t{t}.onnx"
            onnx.utils.extract_model(str(shared), str(one), ["pixel_values"], [f"tokens_{t}"])
            graphs[kind][t] = one
        graphs[kind][0] = shared  # 0 = the shared graph (all budgets)
    return graphs


def session(path: Path, threads: int, provider: str = "cpu"):
    import onnxruntime as ort

    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    if name not in ort.get_available_providers():
        raise SystemExit(
            f"{name} is not available: install onnxruntime-gpu (in place of onnxruntime) on a CUDA machine"
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=[name])


def latencies(
    graphs: dict[str, dict[int, Path]], runs: int, threads: int, provider: str = "cpu", fp16: bool = False
) -> dict[str, dict[int, dict[str, float]]]:
    """Round-robin over every (pyramid, budget) so load on the shared CPU hits all alike."""
    from export.common import parity_images, pixels_for
    from fmvr.config import preset

    x = pixels_for(
        preset("tiny"), parity_images()[0][:1]
    )  # [1, 3, 336, 336], a real photo (same at any width)
    x = x.astype(np.float16) if fp16 else x
    sessions = {(k, t): session(p, threads, provider) for k, d in graphs.items() for t, p in d.items() if t}
    for s in sessions.values():
        s.run(None, {"pixel_values": x})  # warm-up
    times: dict[tuple[str, int], list[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"pixel_values": x})
            times[key].append((time.perf_counter() - t0) * 1000)
    out: dict[str, dict[int, dict[str, float]]] = {k: {} for k in graphs}
    for (k, t), ts in times.items():
        out[k][t] = {
            "median_ms": float(np.median(ts)),
            "min_ms": float(np.min(ts)),
            "p90_ms": float(np.percentile(ts, 90)),
        }
    return out


RSS_CODE = """
import sys, onnxruntime as ort
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss()
sessions = [ort.InferenceSession(p, providers=['CPUExecutionProvider']) for p in sys.argv[1:]]
print(rss() - before)
"""


def resident_bytes(paths: list[Path]) -> int:
    """RSS growth of a fresh process that opens these graphs (sessions kept alive)."""
    res = subprocess.run(
        [sys.executable, "-c", RSS_CODE, *map(str, paths)], capture_output=True, text=True, check=True
    )
    return int(res.stdout.strip())


def layout_costs(graphs: dict[str, dict[int, Path]]) -> dict[str, dict[str, int]]:
    fmvr = graphs["fmvr"]
    per = [p for t, p in fmvr.items() if t]
    return {
        "shared": {"disk_bytes": fmvr[0].stat().st_size, "resident_bytes": resident_bytes([fmvr[0]])},
        "per_budget": {
            "disk_bytes": sum(p.stat().st_size for p in per),
            "resident_bytes": resident_bytes(per),
        },
    }


def llava_7b_weights() -> dict[str, float]:
    """Analytic fp16 weight bytes of the vision graph at llava-1.5-7b widths (no export needed)."""
    from fmvr.config import preset
    from fmvr.flops import param_counts

    p = param_counts(preset("llava-1.5-7b"))
    one = 2 * (p["vision_tower"] + p["projector"] + p["pyramid"])
    return {"one_graph_gb_fp16": one / 1e9, "five_graphs_gb_fp16": 5 * one / 1e9}


def flop_share() -> dict[str, float]:
    """Pyramid FLOPs at budget 1 (all stages run) over tower + projector FLOPs: tiny, small, 7B widths."""
    from fmvr.config import preset
    from fmvr.flops import projector_flops, pyramid_flops, vision_flops

    out = {}
    for name, cfg in (
        ("tiny", preset("tiny")),
        ("small", bench_config("small", "fmvr")),
        ("llava-1.5-7b", preset("llava-1.5-7b")),
    ):
        out[name] = pyramid_flops(cfg, 1) / (vision_flops(cfg) + projector_flops(cfg))
    return out


def markdown(res: dict) -> str:
    lines = [
        f"# Export benchmark ({res['scale']} config, ONNX Runtime {res['provider'].upper()}"
        f"{', fp16' if res['fp16'] else ''})",
        "",
        f"{res['machine']}; batch 1, one real photo, {res['runs']} runs interleaved, {res['threads']} thread(s). "
        "On a shared CPU the minimum is the steadier statistic.",
        "",
        "| budget | FMVR median ms | M3 median ms | none median ms | FMVR / M3 (median) | FMVR / M3 (min) |",
        "|---|---|---|---|---|---|",
    ]
    lat = res["latency"]
    for t in (576, 144, 36, 9, 1):
        f, m = lat["fmvr"][str(t)]["median_ms"], lat["m3"][str(t)]["median_ms"]
        n = lat["none"].get(str(t), {}).get("median_ms")
        fmin, mmin = lat["fmvr"][str(t)]["min_ms"], lat["m3"][str(t)]["min_ms"]
        none = "-" if n is None else f"{n:.2f}"
        lines.append(f"| {t} | {f:.2f} | {m:.2f} | {none} | {f / m:.3f} | {fmin / mmin:.3f} |")
    lay = res["layout"]
    lines += [
        "",
        "| layout (all five budgets) | on disk | resident (RSS growth) |",
        "|---|---|---|",
        *(
            f"| {k} | {v['disk_bytes'] / 1e6:.2f} MB | {v['resident_bytes'] / 1e6:.1f} MB |"
            for k, v in lay.items()
        ),
        "",
        f"At llava-1.5-7b widths (analytic, fp16 weights): one graph {res['llava_7b']['one_graph_gb_fp16']:.2f} GB, "
        f"five per-budget graphs {res['llava_7b']['five_graphs_gb_fp16']:.2f} GB.",
        "",
        "FMVR pyramid FLOPs / (tower + projector) FLOPs: "
        + ", ".join(f"{k} {v:.1e}" for k, v in res["flop_share"].items())
        + ". In small towers the pyramid's memory-bound elementwise ops show; at 7B widths its share is negligible.",
        "",
        "Not measured here (no NVIDIA GPU on this machine): onnxruntime CUDA fp16 latency per budget, "
        "TensorRT build time and engine latency.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [576, 144, 36, 9, 1]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, kind in enumerate(("fmvr", "m3")):
        vals = [res["latency"][kind][str(t)]["median_ms"] for t in budgets]
        ax.bar(np.arange(5) + i * 0.38, vals, width=0.38, label=kind.upper())
    ax.axhline(res["latency"]["none"]["576"]["median_ms"], color="gray", ls="--", label="none (576)")
    ax.set_xticks(np.arange(5) + 0.19, [str(t) for t in budgets])
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("ONNX Runtime CPU ms (median)")
    ax.set_title(f"Vision graph latency, {res['scale']} config, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="timed runs per graph (default 100)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument(
        "--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime provider (cuda: GPU)"
    )
    p.add_argument("--fp16", action="store_true", help="export the graphs in float16 (with --provider cuda)")
    p.add_argument("--scale", default="tiny", choices=("tiny", "small"), help="model widths (default tiny)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_variants(Path(tmp), args.scale, args.fp16)
        lat = latencies(graphs, args.runs, args.threads, args.provider, args.fp16)
        layout = layout_costs(graphs)
    res = {
        "scale": args.scale,
        "provider": args.provider,
        "fp16": args.fp16,
        "machine": f"{os.cpu_count()} CPU cores (shared with other jobs)"
        + (", no GPU used" if args.provider == "cpu" else ", CUDA provider"),
        "runs": args.runs,
        "threads": args.threads,
        "latency": {k: {str(t): v for t, v in d.items()} for k, d in lat.items()},
        "fmvr_over_m3": {str(t): lat["fmvr"][t]["median_ms"] / lat["m3"][t]["median_ms"] for t in lat["m3"]},
        "layout": layout,
        "llava_7b": llava_7b_weights(),
        "flop_share": flop_share(),
        "not_measured": "GPU: onnxruntime CUDA fp16 latency, TensorRT build time/latency (no NVIDIA GPU here)",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    stem = (
        OUT
        / f"export_bench_{args.scale}{'_cuda' if args.provider == 'cuda' else ''}{'_fp16' if args.fp16 else ''}"
    )
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
