"""`python -m runtime latency --bundle B`: what the budgets buy on this device.

1. TTFT per budget (median of `runs`) against the FLOPs ratio of fmvr.flops: how close
   TTFT(T)/TTFT(576) comes to the compute ratio (the physical limit).
2. The policy under load: N requests from each of `concurrency` (default 1, 2, 4) clients at
   each of three deadlines; the fraction that met it and the mean budget, against each fixed
   budget, and the check "wherever a fixed budget meets >= 99 %, the policy meets >= 99 % at a
   mean budget at least as large".
3. Preprocessing on the host (fmvr.preprocess, PIL) vs in the vision graph (a frame-input
   bundle, --preprocess graph): ms per request on the host and in the graph, and TTFT at 36
   tokens, for a JPEG request and a raw camera frame (numpy).
4. Several frames per request (N = 1, 2, 4, 6 camera frames at 36 tokens each): one batched
   vision pass vs N single passes, and the N-frame request's TTFT (runtime.tools.batching).

Writes latency.json, latency.md and latency.png under --out.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmvr.atomic import open_atomic, write_json, write_text
from fmvr.provenance import run_record
from runtime.measure import synthetic_image, time_ms
from runtime.tools.batching import batching as _batching
from runtime.tools.batching import to_markdown as to_markdown_batching

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

PROMPT = "What is in the picture? Answer the question using a single word or phrase."


def ttft_per_budget(pipe: Pipeline, image: Any, runs: int) -> list[dict[str, Any]]:
    from fmvr.flops import budget_table

    text = len(pipe.prompt_ids(PROMPT)) - 1
    flops = {r["tokens"]: r for r in budget_table(pipe.cfg, text)}
    full = pipe.budgets[0]
    rows = []
    for t in pipe.budgets:
        pipe.ask(image, PROMPT, tokens=t, max_new_tokens=1)  # warm-up
        rs = [pipe.ask(image, PROMPT, tokens=t, max_new_tokens=1) for _ in range(runs)]
        row = {
            "budget": t,
            "ttft_ms": statistics.median(r.measured_ms["ttft"] for r in rs),
            "vision_ms": statistics.median(r.measured_ms["vision"] for r in rs),
            "prefill_ms": statistics.median(r.measured_ms["prefill"] for r in rs),
            "total_flops": flops[t]["total_flops"],
            "llm_prefill_flops": flops[t]["llm_prefill_flops"],
        }
        rows.append(row)
    base = next(r for r in rows if r["budget"] == full)
    for r in rows:
        r["ttft_ratio"] = r["ttft_ms"] / base["ttft_ms"]
        r["compute_ratio"] = (r["vision_ms"] + r["prefill_ms"]) / (base["vision_ms"] + base["prefill_ms"])
        r["flops_ratio"] = r["total_flops"] / base["total_flops"]
        r["prefill_ratio"] = r["prefill_ms"] / base["prefill_ms"]
        r["prefill_flops_ratio"] = r["llm_prefill_flops"] / base["llm_prefill_flops"]
    return rows


def _load(pipe: Pipeline, image: Any, n: int, concurrency: int, **kw: Any) -> list[Any]:
    """n requests from `concurrency` threads; results in completion order."""
    results: list[Any] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def client() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            r = pipe.ask(image, PROMPT, max_new_tokens=1, **kw)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def _summary(name: str, deadline: float, rs: list[Any], wall: float) -> dict[str, Any]:
    met = [r.measured_ms["ttft"] <= deadline for r in rs]
    return {
        "config": name,
        "deadline_ms": deadline,
        "met_fraction": sum(met) / len(met),
        "mean_budget": statistics.mean(r.budget for r in rs),
        "budgets_used": sorted({r.budget for r in rs}, reverse=True),
        "p50_ttft_ms": statistics.median(r.measured_ms["ttft"] for r in rs),
        "throughput_rps": len(rs) / wall,
    }


def policy_under_load(
    pipe: Pipeline, image: Any, rows: list[dict[str, Any]], n: int, concurrency: int
) -> dict:
    """Deadlines from the single-request TTFTs (tight: the middle budget's; loose: the largest's
    x1.5); under load every request is slower, so the policy must trade budget for time."""
    by_t = {r["budget"]: r["ttft_ms"] for r in rows}
    mid = pipe.budgets[len(pipe.budgets) // 2]
    deadlines = [round(by_t[mid], 1), round(by_t[pipe.budgets[0]], 1), round(by_t[pipe.budgets[0]] * 1.5, 1)]
    out: dict[str, Any] = {"deadlines_ms": deadlines, "requests": n, "concurrency": concurrency, "runs": []}
    fixed = {}
    for t in pipe.budgets:
        t0 = time.perf_counter()
        fixed[t] = (_load(pipe, image, n, concurrency, tokens=t), time.perf_counter() - t0)
    for d in deadlines:
        t0 = time.perf_counter()
        rs = _load(pipe, image, n, concurrency, latency_ms=d)
        out["runs"].append(_summary("policy", d, rs, time.perf_counter() - t0))
        out["runs"] += [_summary(f"fixed {t}", d, *fixed[t]) for t in pipe.budgets]
    out["check"] = load_check(out)
    return out


def preprocess_comparison(pipe: Pipeline, runs: int) -> dict[str, Any]:
    """Host (PIL) vs graph preprocessing per request: host ms (decode / pad + resize on the CPU),
    in-graph ms (the graph's pixels output alone, onnxruntime backends), TTFT at 36 tokens."""
    import io

    import numpy as np
    from PIL import Image

    t = 36 if 36 in pipe.budgets else pipe.budgets[len(pipe.budgets) // 2]
    camera = np.asarray(Image.open(io.BytesIO(synthetic_image(1280, 720))).convert("RGB"))  # [720, 1280, 3]
    inputs = {"jpeg 640x480 (bytes)": synthetic_image(), "frame 1280x720 (numpy)": camera}
    graph = pipe.manifest.vision.frame_input
    modes = ("host", "graph") if graph else ("host",)
    rows, before = [], pipe.preprocess_mode
    try:
        for name, image in inputs.items():
            for mode in modes:
                pipe.preprocess_mode = mode
                rows.append({"input": name, "preprocess": mode, **_preprocess_times(pipe, image, t, runs)})
    finally:
        pipe.preprocess_mode = before
    note = "" if graph else "this bundle's graphs take pixels (exported with --preprocess host): host only"
    return {"budget": t, "rows": rows, "note": note}


def _preprocess_times(pipe: Pipeline, image: Any, tokens: int, runs: int) -> dict[str, Any]:
    host = statistics.median(time_ms(lambda: pipe.prepare(image), 2, runs))
    x = pipe.prepare(image)  # what the graph takes
    pixels = getattr(pipe.vision, "pixels", None) if pipe.manifest.vision.frame_input else None
    in_graph = statistics.median(time_ms(lambda: pixels(x), 2, runs)) if pixels else None
    rs = [pipe.ask(image, PROMPT, tokens=tokens, max_new_tokens=1) for _ in range(runs + 1)][1:]
    ttft = statistics.median(r.measured_ms["ttft"] for r in rs)
    return {"host_ms": host, "in_graph_ms": in_graph, f"ttft_{tokens}_ms": ttft}


def multi_frame(pipe: Pipeline, runs: int) -> dict[str, Any]:
    """N = 1, 2, 4, 6 camera frames 640x480: batched vs single vision passes, N-frame TTFT."""
    t = 36 if 36 in pipe.budgets else pipe.budgets[len(pipe.budgets) // 2]
    return {"tokens": t, "rows": _batching(pipe, [1, 2, 4, 6], runs, t, 640, 480)}


def to_markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# Runtime benchmark ({rep['device']['key']}, vision {rep['backend']}, LLM {rep['llm_provider']})",
        "",
    ]
    if "code" in rep:
        code = rep["code"]
        lines += [f"`{rep['command']}`; code {code['commit']} (dirty: {code['dirty']}), {rep['created']}", ""]
    lines += [
        "## TTFT per budget vs FLOPs",
        "",
        "| budget | TTFT ms | vision ms | prefill ms | TTFT ratio | (vision+prefill) ratio | FLOPs ratio "
        "| prefill ratio | prefill FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["ttft"]:
        lines.append(
            f"| {r['budget']} | {r['ttft_ms']:.2f} | {r['vision_ms']:.2f} | {r['prefill_ms']:.2f} | "
            f"{r['ttft_ratio']:.3f} | {r['compute_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['prefill_ratio']:.3f} | {r['prefill_flops_ratio']:.3f} |"
        )
    for load in rep["load"]:
        lines += load_markdown(load)
    lines += preprocess_markdown(rep.get("preprocess"))
    if rep.get("multi_frame"):
        mf = rep["multi_frame"]
        lines += [
            "",
            "## Several frames per request",
            "",
            to_markdown_batching(mf["rows"], mf["tokens"], rep["backend"]),
        ]
    return "\n".join(lines) + "\n"


def load_check(load: dict[str, Any], target: float = 0.99) -> list[dict[str, Any]]:
    """Per deadline: the largest fixed budget meeting `target`, and whether the policy met
    `target` with a mean budget at least that large (vacuous where no fixed budget does)."""
    rows = []
    for d in load["deadlines_ms"]:
        at_d = [r for r in load["runs"] if r["deadline_ms"] == d]
        policy = next(r for r in at_d if r["config"] == "policy")
        good = [r for r in at_d if r["config"] != "policy" and r["met_fraction"] >= target]
        best = max(good, key=lambda r: r["mean_budget"], default=None)
        ok = best is None or (
            policy["met_fraction"] >= target and policy["mean_budget"] >= best["mean_budget"]
        )
        rows.append(
            {
                "deadline_ms": d,
                "best_fixed": None if best is None else best["config"],
                "best_fixed_budget": None if best is None else best["mean_budget"],
                "policy_met": policy["met_fraction"],
                "policy_mean_budget": policy["mean_budget"],
                "kept": ok,
            }
        )
    return rows


def load_markdown(load: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Policy under load: {load['requests']} requests per config, {load['concurrency']} "
        "concurrent clients, deadline on TTFT",
        "",
        "| deadline ms | config | deadline met | mean budget | p50 TTFT ms | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in load["runs"]:
        lines.append(
            f"| {r['deadline_ms']:.1f} | {r['config']} | {r['met_fraction']:.0%} | {r['mean_budget']:.1f} | "
            f"{r['p50_ttft_ms']:.2f} | {r['throughput_rps']:.1f} |"
        )
    lines += [
        "",
        "Target: wherever a fixed budget meets >= 99 %, the policy meets >= 99 % with a mean budget at least its.",
        "",
        "| deadline ms | largest fixed budget at >= 99 % | policy met | policy mean budget | kept |",
        "|---|---|---|---|---|",
    ]
    for c in load["check"]:
        best = "none" if c["best_fixed"] is None else f"{c['best_fixed_budget']:.0f}"
        kept = "yes" if c["kept"] else "NO"
        lines.append(
            f"| {c['deadline_ms']:.1f} | {best} | {c['policy_met']:.0%} | {c['policy_mean_budget']:.1f} | {kept} |"
        )
    return lines


def preprocess_markdown(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    t = pre["budget"]
    lines = [
        "",
        f"## Preprocessing: host (PIL) vs in the vision graph, median ms per request, TTFT at {t} tokens",
        "",
        *([pre["note"], ""] if pre["note"] else []),
        f"| input | preprocess | host ms | in-graph ms | TTFT {t} ms |",
        "|---|---|---|---|---|",
    ]
    for r in pre["rows"]:
        graph = "-" if r["in_graph_ms"] is None else f"{r['in_graph_ms']:.2f}"
        lines.append(
            f"| {r['input']} | {r['preprocess']} | {r['host_ms']:.2f} | {graph} | {r[f'ttft_{t}_ms']:.2f} |"
        )
    return lines


def plot(rep: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib for the plot)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["ttft"]
    fig, (a, *panels) = plt.subplots(1, 1 + len(rep["load"]), figsize=(5.5 * (1 + len(rep["load"])), 4))
    xs = [r["budget"] for r in rows]
    a.plot(xs, [r["ttft_ratio"] for r in rows], "o-", label="measured TTFT(T)/TTFT(576)")
    a.plot(xs, [r["flops_ratio"] for r in rows], "s--", label="FLOPs(T)/FLOPs(576)")
    a.plot(xs, [r["compute_ratio"] for r in rows], "d-", label="measured (vision+prefill) ratio")
    a.plot(xs, [r["prefill_ratio"] for r in rows], "^-", label="measured prefill ratio")
    a.plot(xs, [r["prefill_flops_ratio"] for r in rows], "v--", label="prefill FLOPs ratio")
    a.set_xscale("log")
    a.set_xlabel("visual tokens")
    a.set_ylabel("ratio to 576")
    a.legend(fontsize=8)
    a.set_title("TTFT vs compute")
    for b, load in zip(panels, rep["load"]):
        _load_panel(b, load)
    fig.tight_layout()
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def _load_panel(b: Any, load: dict[str, Any]) -> None:
    """Bars: fraction of deadlines met per config at each deadline, for one concurrency."""
    runs, deadlines = load["runs"], load["deadlines_ms"]
    configs = [r["config"] for r in runs if r["deadline_ms"] == deadlines[0]]
    width = 0.8 / len(configs)
    for i, c in enumerate(configs):
        met = [
            next(r["met_fraction"] for r in runs if r["config"] == c and r["deadline_ms"] == d)
            for d in deadlines
        ]
        b.bar([k + i * width for k in range(len(deadlines))], met, width, label=c)
    b.set_xticks([k + 0.4 - width / 2 for k in range(len(deadlines))], [f"{d:g} ms" for d in deadlines])
    b.set_ylabel("fraction of deadlines met")
    b.set_title(f"under load ({load['concurrency']} clients)")
    b.legend(fontsize=7)


def run_latency(
    pipe: Pipeline, out: Path, runs: int = 5, requests: int = 40, concurrency: Sequence[int] = (1, 2, 4)
) -> dict[str, Any]:
    image = synthetic_image()
    print("measuring a fresh profile (this run's threads and load; not saved)")
    pipe.measure_profile(save=False)
    with pipe.prefix_cache_off():  # one frame asked again and again: time the uncached path
        rows = ttft_per_budget(pipe, image, runs)
        rep = {
            **run_record(),  # the command and the code version that measured it
            "device": {**pipe.device, "key": pipe.policy.profile.key},
            "backend": pipe.vision.name,
            "llm_provider": pipe.decoder.provider,
            "bundle": str(pipe.bundle_dir),
            "llm_quant": pipe.manifest.llm.quant,
            "ttft": rows,
            "load": [policy_under_load(pipe, image, rows, requests, c) for c in concurrency],
            "preprocess": preprocess_comparison(pipe, runs),
            "multi_frame": multi_frame(pipe, runs),
        }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "latency.json", rep, sort_keys=True)
    md = to_markdown(rep)
    write_text(out / "latency.md", md)
    made = ["latency.json", "latency.md"]
    if plot(rep, out / "latency.png"):
        made.append("latency.png")
    print(md)
    print(f"wrote {', '.join(str(out / m) for m in made)}")
    print(f"next: python -m runtime serve --bundle {pipe.bundle_dir}")
    return rep
