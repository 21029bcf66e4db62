"""TTFT per budget of one bundle from two checkouts, run alternately: an A/B of a runtime change.

    python benchmarks/latency_ab.py --bundle runs/demo/bundle --before /work/ab/before --after . \
        --pairs 4 --out benchmarks/results/latency_small_spinning

The `before` checkout is a worktree of the commit without the change
(`git worktree add --detach /work/ab/before <commit>`); both run under this interpreter and its
virtualenv (`python -m` imports the checkout's own packages first). Each pair runs
`python -m runtime latency --bundle BUNDLE --threads 2 --runs 5 --requests 3 --concurrency 1`
once from each checkout, in alternating order (before first in odd pairs), so drift of a shared
machine falls on both sides; a run is the whole latency job (a minute or two: profile, load,
preprocessing), of which only the TTFT table is kept. Writes OUT/runs.jsonl as runs finish
(a failed pair loses nothing), then OUT/summary.{json,md}: the medians over pairs of TTFT,
prefill and vision per budget, the TTFT ratio to 576 tokens against the FLOPs ratio, each
side's code version as its own run recorded it, and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402

KEYS = ("ttft_ms", "prefill_ms", "vision_ms", "ttft_ratio", "flops_ratio")


def describe(checkout: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return out.stdout.strip()[:160] if out.returncode == 0 else str(checkout)


def one_run(checkout: Path, bundle: Path, out: Path, threads: int) -> dict:
    """`runtime latency` from `checkout`: its latency.json (the `ttft` rows, `code` where recorded)."""
    cmd = [sys.executable, "-m", "runtime", "latency", "--bundle", str(bundle), "--threads", str(threads),
           "--runs", "5", "--requests", "3", "--concurrency", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"runtime latency failed in {checkout} (exit {done.returncode}):\n{tail}")
    return json.loads((out / "latency.json").read_text())


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for budget in sorted({r["budget"] for r in runs}, reverse=True):
        row: dict = {"budget": budget}
        for side in ("before", "after"):
            mine = [r for r in runs if r["budget"] == budget and r["side"] == side]
            if not mine:
                raise SystemExit(
                    f"budget {budget} was timed on one side only: the two checkouts serve other budgets"
                )
            for k in KEYS:
                row[f"{k}_{side}"] = statistics.median(r[k] for r in mine)
        if abs(row["flops_ratio_before"] - row["flops_ratio_after"]) > 1e-9:
            raise SystemExit(
                f"budget {budget}: the two checkouts count FLOPs differently; compare like with like"
            )
        row["flops_ratio"] = row.pop("flops_ratio_before")
        del row["flops_ratio_after"]
        rows.append(row)
    return rows


def to_markdown(d: dict) -> str:
    lines = [
        f"# TTFT per budget, two checkouts alternately ({d['pairs']} pairs, medians)",
        "",
        f"`{d['command']}`",
        "",
        f"- before: {d['sides']['before']}",
        f"- after: {d['sides']['after']}",
        f"- machine: {d['machine']['cpu']}, {d['machine']['logical_cpus']} logical CPUs, "
        f"flags {', '.join(d['machine']['cpu_flags']) or 'none of note'}",
        "",
        "| budget | TTFT before ms | TTFT after ms | prefill before | prefill after | vision before | vision after "
        "| TTFT ratio before | TTFT ratio after | FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["summary"]:
        lines.append(
            f"| {r['budget']} | {r['ttft_ms_before']:.0f} | {r['ttft_ms_after']:.0f} | {r['prefill_ms_before']:.0f} | "
            f"{r['prefill_ms_after']:.0f} | {r['vision_ms_before']:.1f} | {r['vision_ms_after']:.1f} | "
            f"{r['ttft_ratio_before']:.3f} | {r['ttft_ratio_after']:.3f} | {r['flops_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--before", type=Path, required=True, help="the checkout without the change")
    ap.add_argument("--after", type=Path, default=ROOT, help="the checkout with it (default: this one)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: list[dict] = []
    code: dict[str, list] = {"before": [], "after": []}
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(1, args.pairs + 1):
            order = ("before", "after") if pair % 2 else ("after", "before")
            for side in order:
                got = one_run(sides[side], args.bundle.resolve(), Path(tmp) / f"{side}-{pair}", args.threads)
                code[side].append(got.get("code"))
                rows = [
                    {"pair": pair, "side": side, **{k: r[k] for k in ("budget", *KEYS)}} for r in got["ttft"]
                ]
                with log.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                runs += rows
                print(
                    f"pair {pair} {side}: " + ", ".join(f"{r['budget']}: {r['ttft_ms']:.0f} ms" for r in rows)
                )
    d = {
        **run_record(),
        "bundle": str(args.bundle),
        "pairs": args.pairs,
        "threads": args.threads,
        "sides": {k: describe(v) for k, v in sides.items()},
        "side_code": {
            k: v[0] for k, v in code.items()
        },  # each side's own record (commit, dirty, source hash)
        "summary": summarise(runs),
        "runs": runs,
    }
    write_json(args.out / "summary.json", d)
    write_text(args.out / "summary.md", to_markdown(d))
    print(to_markdown(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
