"""SIGKILL `python -m export --force` at moments spread over its run (a power cut, the OOM killer, a
robot's watchdog) and check what a user finds at --out: after every kill the bundle verifies and
answers; after the next export completes, nothing is left beside it.

    python dev/kill_export.py --checkpoint runs/demo/train/final --kills 10

Writes dev/results/kill_export_<preset>.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.provenance import run_record  # noqa: E402


def export(checkpoint: Path, out: Path, quant: str, kill_after: float | None) -> tuple[int, float, str]:
    """One `python -m export --force` run, SIGKILLed after `kill_after` s: (rc, seconds, stderr tail)."""
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
    cmd += ["--quant", quant, "--force"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: no handler runs
        _, err = proc.communicate()
    return proc.returncode, time.monotonic() - t0, err[-1500:]


def answers(bundle: Path) -> str:
    """'' when the bundle verifies and answers a question at its smallest budget, else the error."""
    from PIL import Image

    from runtime.pipeline import Pipeline

    try:
        pipe = Pipeline.load(bundle)
        res = pipe.ask(
            Image.new("RGB", (96, 96), "red"),
            "What colour is it?",
            tokens=min(pipe.budgets),
            max_new_tokens=2,
        )
        return "" if res.token_ids else "no tokens"
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{type(e).__name__}: {e}"


def beside(bundle: Path) -> tuple[list[str], int]:
    """Names and bytes of everything beside the bundle (staging, old or version folders)."""
    names, total = [], 0
    for p in bundle.parent.iterdir():
        if p.name == bundle.name:
            continue
        names.append(p.name)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
        total += sum(f.stat().st_size for f in files)
    return sorted(names), total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint directory")
    p.add_argument("--kills", type=int, default=10, help="kills, spread evenly over one export's run time")
    p.add_argument("--quant", default="int8", help="the export's --quant")
    p.add_argument("--out", type=Path, default=ROOT / "dev/results", help="where the JSON and Markdown go")
    args = p.parse_args(argv)
    preset = json.loads((args.checkpoint / "config.json").read_text())["name"]
    work = Path(tempfile.mkdtemp(prefix="kill-export-"))
    bundle = work / "bundles" / "bundle"
    bundle.parent.mkdir()
    rc, full_s, err = export(args.checkpoint, bundle, args.quant, None)
    if rc != 0:
        raise SystemExit(f"the first export failed (rc {rc}):\n{err}")
    print(f"one export: {full_s:.1f} s")
    rows = []
    for k in range(args.kills):
        at = full_s * (k + 0.5) / args.kills
        rc, took, err = export(args.checkpoint, bundle, args.quant, at)
        problem = answers(bundle)
        names, size = beside(bundle)
        rows.append(
            {
                "kill_at_s": round(at, 1),
                "rc": rc,
                "killed": rc == -9,
                "answers": not problem,
                "problem": problem,
                "beside": names,
                "beside_bytes": size,
            }
        )
        print(
            f"kill {k + 1}/{args.kills} at {at:.1f} s: rc {rc}, answers {not problem} {problem}, "
            f"{len(names)} beside ({size / 1e6:.0f} MB)"
        )
    rc, took, err = export(args.checkpoint, bundle, args.quant, None)
    names, size = beside(bundle)
    final = {
        "rc": rc,
        "seconds": round(took, 1),
        "answers": not answers(bundle),
        "beside": names,
        "beside_bytes": size,
        "freed_message": [ln for ln in err.splitlines() if "freed" in ln][-3:],
    }
    shutil.rmtree(work, ignore_errors=True)
    res = {
        **run_record(),
        "preset": preset,
        "quant": args.quant,
        "export_s": round(full_s, 1),
        "kills": rows,
        "after_next_export": final,
        "summary": {
            "killed": sum(r["killed"] for r in rows),
            "answered": sum(r["answers"] for r in rows),
            "max_beside_bytes_between": max((r["beside_bytes"] for r in rows), default=0),
            "beside_bytes_after_next_export": size,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kill_export_{preset}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    s = res["summary"]
    md = [
        f"# SIGKILL during `python -m export --force` ({preset}, --quant {args.quant})",
        "",
        f"Command: `{res['command']}`; code {res['code']['commit']} (dirty: {res['code']['dirty']}).",
        "",
        f"One export takes {full_s:.0f} s here. {s['killed']}/{len(rows)} runs were killed before finishing; "
        f"after each kill the bundle at --out verified and answered in {s['answered']}/{len(rows)}. "
        f"Up to {s['max_beside_bytes_between'] / 1e6:.0f} MB of staging sat beside it between kills; after the "
        f"next export: {size} bytes.",
        "",
        "| kill at (s) | killed | bundle answers | beside the bundle (MB) |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['kill_at_s']} | {r['killed']} | {r['answers']} | {r['beside_bytes'] / 1e6:.0f} |" for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0 if s["answered"] == len(rows) and size == 0 and final["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
