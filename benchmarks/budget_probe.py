"""Does a benchmark variant make visual tokens buy accuracy? A linear probe, before any training.

    python benchmarks/budget_probe.py --preset small            # ~1 min on 2 cores

The frozen vision tower's grid features are pooled to each budget as M3 pools them (2x2 average
pooling down the cascade, so at budget T each token averages a (G / sqrt T)^2 window), and for
every object the pooled token holding its centre (at the full grid: the mean under its box) is
fed to a logistic regression that names the object's colour, or its shape. The probe is fit on
`train`-split scenes and scored on `val` scenes (the test split stays for the evidence). A
variant in which the 9-token probe is far below the 576-token one is a benchmark where a
deadline that forces fewer tokens costs accuracy. Writes <out>/budget_probe_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmvr import atomic, tasks  # noqa: E402
from fmvr.config import preset  # noqa: E402
from fmvr.preprocess import Preprocessor  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402
from fmvr.towers import build_tower  # noqa: E402

TARGETS = ("colour", "shape")


def grids(cfg, tower, split: str, n: int, variant: str) -> list[tuple[tasks.Scene, np.ndarray]]:
    """(scene, [G, G, C] tower features) for the first n scenes of a split."""
    pre = Preprocessor.from_config(cfg)
    g = cfg.grid
    out = []
    with torch.no_grad():
        for scene in tasks.scenes(split, n, variant=variant):
            x = torch.from_numpy(pre(tasks.render_scene(scene)))  # [1, 3, S, S]
            out.append((scene, tower(x)[0].reshape(g, g, -1).float().numpy()))  # [G, G, C]
    return out


def object_feature(f: np.ndarray, box: tuple[int, int, int, int], tokens: int) -> np.ndarray:
    """[C]: the token holding the box's centre on the grid pooled to `tokens` (full grid: box mean)."""
    g = f.shape[0]
    side = int(round(tokens**0.5))
    x0, y0, x1, y1 = (v * g / tasks.SIZE for v in box)
    if side == g:
        return f[int(y0) : max(int(y1), int(y0) + 1), int(x0) : max(int(x1), int(x0) + 1)].mean((0, 1))
    k = g // side
    pooled = f.reshape(side, k, side, k, -1).mean((1, 3))  # [side, side, C]
    return pooled[min(int((y0 + y1) / 2) // k, side - 1), min(int((x0 + x1) / 2) // k, side - 1)]


def dataset(data, target: str, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    xs = [object_feature(f, o.box, tokens) for s, f in data for o in s.objects]
    ys = [getattr(o, target) for s, _ in data for o in s.objects]
    return np.stack(xs), np.asarray(ys)  # [N, C], [N]


def probe(train, val, target: str, tokens: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = dataset(train, target, tokens)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    clf.fit(x, y)
    xv, yv = dataset(val, target, tokens)
    return float((clf.predict(xv) == yv).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="small", help="model preset whose (pretrained, frozen) tower is probed"
    )
    p.add_argument("--variants", default="easy,detail", help="benchmark variants, comma-separated")
    p.add_argument("--bench-n", type=int, default=160, help="train-split scenes the probes are fit on")
    p.add_argument("--val-n", type=int, default=48, help="val-split scenes they are scored on")
    p.add_argument("--out", default="benchmarks/results", help="folder for budget_probe_<preset>.{json,md}")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = preset(args.preset)
    tower = build_tower(cfg.vision).eval()
    if cfg.vision.weights:
        from fmvr.towers import load_effnet_pretrained

        load_effnet_pretrained(tower)
    rows = []
    for variant in args.variants.split(","):
        train = grids(cfg, tower, "train", args.bench_n, variant)
        val = grids(cfg, tower, "val", args.val_n, variant)
        for target in TARGETS:
            for t in cfg.budgets[:-1]:  # 1 token is the image mean: no object has a token of its own
                acc = probe(train, val, target, t)
                rows.append({"variant": variant, "target": target, "tokens": t, "accuracy": acc})
                print(f"{variant:7s} {target:7s} {t:4d} tokens: {acc:.3f}", flush=True)
    res = {
        **run_record(["benchmarks/budget_probe.py", *(sys.argv[1:] if argv is None else argv)]),
        "preset": args.preset,
        "fit": {"split": "train", "scenes": args.bench_n},
        "scored": {"split": "val", "scenes": args.val_n},
        "rows": rows,
    }
    out = Path(args.out)
    atomic.write_json(out / f"budget_probe_{args.preset}.json", res, indent=1)
    atomic.write_text(out / f"budget_probe_{args.preset}.md", markdown(res))
    print(f"wrote {out / f'budget_probe_{args.preset}.json'} and .md")
    return 0


def markdown(res: dict) -> str:
    budgets = sorted({r["tokens"] for r in res["rows"]}, reverse=True)
    head = "| variant | target | " + " | ".join(f"{t} tokens" for t in budgets) + " |"
    lines = [head, "|---|---|" + "---:|" * len(budgets)]
    for v in dict.fromkeys(r["variant"] for r in res["rows"]):
        for target in TARGETS:
            acc = {
                r["tokens"]: r["accuracy"] for r in res["rows"] if (r["variant"], r["target"]) == (v, target)
            }
            lines.append(f"| {v} | {target} | " + " | ".join(f"{acc[t]:.3f}" for t in budgets) + " |")
    code = res["code"]
    return (
        f"# Budget probe: `{res['preset']}` tower, frozen\n\n"
        f"Linear probe (logistic regression, C 0.1, standardised) on the object's token of the grid pooled to each "
        f"budget (M3 pooling); fit on {res['fit']['scenes']} train scenes, scored on {res['scored']['scenes']} val "
        f"scenes. Accuracy:\n\n" + "\n".join(lines) + "\n\n"
        f"Command: `{res['command']}`; commit {code['commit']} (dirty: {code['dirty']}), "
        f"source sha256 {code['source_sha256'][:12]}; {res['created']}.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
