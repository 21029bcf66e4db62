"""Where a frame's vision pass goes: in-graph preprocessing, tower, projector and pyramid.

    python benchmarks/vision_speed.py --bundle runs/demo/bundle --threads 2 --frame 640x480

On one camera-sized frame (scikit-learn's china.jpg resized to --frame), medians over --reps:
- `full`: the vision pass, uint8 frame in, every budget's tokens out (what the runtime runs per
  frame): the bundle's graph, with its preprocessing inside (--preprocess graph) or the runtime's
  host preprocessing first (PIL; a bundle exported with --preprocess host);
- `preprocess`: the preprocessing alone (pad, resize, normalise), in the graph or on the host;
- onnxruntime's per-node profile of one full pass, summed by part: the preprocessing nodes
  (named preprocess/...) and the rest by operator type (Conv and friends are the tower,
  MatMul/Erf the projector, pooling the pyramid).
Writes benchmarks/results/vision_speed_<model>_<graph|host>.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402


def frame(size: tuple[int, int]) -> np.ndarray:
    """A real photo at `size` (W, H): uint8 [1, H, W, 3]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)[None]


def median_ms(fn: Any, reps: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), times


def node_profile(path: Path, x: np.ndarray, input_name: str, threads: int, runs: int = 3) -> dict[str, float]:
    """ms per part of one pass (mean over the profiled passes, the warm-up included), from
    onnxruntime's node-level profile."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "vision")
        s = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            s.run(None, {input_name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    parts: dict[str, float] = defaultdict(float)
    runs_seen = sum(1 for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "?")
        parts["preprocess" if name.startswith("preprocess/") else op] += e["dur"] / 1000
    return {k: v / max(1, runs_seen) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def vision_pass(bundle: Path, threads: int, x: np.ndarray) -> tuple[Any, str, Any, Any]:
    """(OrtVision, "graph" | "host", the whole pass of frame x, its preprocessing alone): a
    frame-input bundle preprocesses in its graph, a pixel-input one (--preprocess host) on the
    host as the runtime does (PIL pad + resize, normalise)."""
    from runtime.bundle import read_manifest
    from runtime.vision import OrtVision

    m = read_manifest(bundle)
    vis = OrtVision(bundle, m, "ort-cpu", threads=threads)
    budgets = list(vis.budgets)
    if m.vision.preprocess is not None and m.vision.preprocess.graph:
        return vis, "graph", lambda: vis.encode(x, budgets), lambda: vis.pixels(x)
    from PIL import Image

    from fmvr.preprocess import Preprocessor

    host, image = Preprocessor.from_dict(m.preprocessing), Image.fromarray(x[0])
    return vis, "host", lambda: vis.encode(host(image), budgets), lambda: host(image)


def main(argv: list[str] | None = None) -> int:
    from export.framegraph import parse_frame_size
    from runtime.bundle import read_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frame", default="640x480", help="WIDTHxHEIGHT of the camera frame")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--vs", type=Path, help="another bundle's vision graph, timed interleaved with this one")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    m = read_manifest(a.bundle)
    x = frame(parse_frame_size(a.frame))
    vis, where, pass_, pre_ = vision_pass(a.bundle, a.threads, x)
    budgets = list(vis.budgets)
    full, full_all = median_ms(pass_, a.reps)
    pre, pre_all = median_ms(pre_, a.reps)
    files = sorted({o.file for o in vis.outputs.values()})
    graph_in = x if where == "graph" else pre_()
    prof = node_profile(a.bundle / files[0], graph_in, vis.input_name, a.threads)
    vs = None
    if a.vs:  # A B A B ...: both see the same machine state
        other = vision_pass(a.vs, a.threads, x)[2]
        ab: dict[str, list[float]] = {"this": [], "vs": []}
        for _ in range(a.reps):
            for k, fn in (("this", pass_), ("vs", other)):
                ab[k].append(median_ms(fn, 1)[0])
        vs = {"bundle": str(a.vs), "this_ms": statistics.median(ab["this"]), "vs_ms": statistics.median(ab["vs"]),
              "this_all": ab["this"], "vs_all": ab["vs"]}  # fmt: skip
    rec = {**run_record(), "bundle": str(a.bundle), "model": m.model.get("name"), "threads": a.threads, "preprocess": where,
           "frame": list(x.shape), "budgets": budgets, "reps": a.reps,
           "full_ms": full, "preprocess_ms": pre, "rest_ms": full - pre,
           "full_ms_all": full_all, "preprocess_ms_all": pre_all, "profile_ms": prof, "vs": vs}  # fmt: skip
    tag = f"{m.model.get('name', 'model')}_{where}"
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"vision_speed_{tag}.json", rec)
    write_text(a.out / f"vision_speed_{tag}.md", markdown(rec))
    print(markdown(rec))
    return 0


def markdown(rec: dict[str, Any]) -> str:
    _, h, w, _ = rec["frame"]
    prof = rec["profile_ms"]
    total = sum(prof.values())
    lines = [
        f"# Vision pass of one {w}x{h} frame ({rec['model']}, {rec['threads']} threads)",
        "",
        f"`{rec['command']}` (commit {rec['code']['commit'][:12]}{' dirty' if rec['code']['dirty'] else ''}).",
        "",
        f"- the vision pass (frame in, budgets {rec['budgets']} out): **{rec['full_ms']:.1f} ms** median of {rec['reps']}",
        f"- preprocessing alone ({rec.get('preprocess', 'graph')}): {rec['preprocess_ms']:.1f} ms; the rest (tower, projector, pyramid): "
        f"{rec['rest_ms']:.1f} ms",
        "",
        f"onnxruntime node profile of one pass (kernel time, {total:.1f} ms in all):",
        "",
        "| part | ms | share |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" for k, v in list(prof.items())[:12]]
    if rec.get("vs"):
        v = rec["vs"]
        lines += ["", f"Interleaved with `{v['bundle']}` ({rec['reps']} pairs): this {v['this_ms']:.1f} ms, "
                  f"that {v['vs_ms']:.1f} ms (medians)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
