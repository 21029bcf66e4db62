"""Does the frozen vision tower carry what the benchmark asks? Linear probes on its grid features.

    python dev/tower_probe.py --preset small            # ~1 min on 2 cores

For each object of a scene (and the digit card), the tower's grid features under the object's box
are averaged (at 576 tokens: the box's cells; at a pooled budget: the pooled cell holding the box
centre), and a logistic regression trained on `train`-split scenes predicts the object's colour,
its shape, or the card's digit on `test`-split scenes. High probe accuracy with a model that still
answers from the priors says the gap is in the projector/LM, not the tower. Writes
<out>/tower_probe_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmvr import (
    atomic,  # noqa: E402
    tasks,  # noqa: E402
)
from fmvr.config import preset  # noqa: E402
from fmvr.preprocess import Preprocessor  # noqa: E402
from fmvr.towers import build_tower  # noqa: E402

TARGETS = ("colour", "shape", "digit")


def grids(cfg, tower, split: str, n: int) -> list[tuple[tasks.Scene, np.ndarray]]:
    """(scene, [G, G, C] features of `tower`) for the first n scenes of a split."""
    pre = Preprocessor.from_config(cfg)
    g = cfg.vision.image_size // cfg.vision.patch_size
    out = []
    with torch.no_grad():
        for scene in tasks.scenes(split, n):
            x = torch.from_numpy(np.stack(list(pre([tasks.render_scene(scene)]))))  # [1, 3, S, S]
            out.append((scene, tower(x)[0].reshape(g, g, -1).numpy()))
    return out


def box_features(f: np.ndarray, box: tuple[int, int, int, int], tokens: int) -> np.ndarray:
    """[C]: the mean feature under `box` (scene pixels) on the grid pooled to `tokens` cells."""
    g = f.shape[0]
    side = int(round(tokens**0.5))
    k = g // side
    x0, y0, x1, y1 = (int(round(v * g / tasks.SIZE)) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    if k == 1:
        return f[y0:y1, x0:x1].mean((0, 1))
    pooled = f.reshape(side, k, side, k, -1).mean((1, 3))  # [side, side, C]
    return pooled[(y0 + y1) // 2 // k, (x0 + x1) // 2 // k]


def dataset(data, target: str, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for scene, f in data:
        if target == "digit":
            xs.append(box_features(f, scene.digit_box, tokens))
            ys.append(str(scene.digit))
        else:
            for o in scene.objects:
                xs.append(box_features(f, o.box, tokens))
                ys.append(getattr(o, target))
    return np.stack(xs), np.array(ys)


def probe(train, test, target: str, tokens: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    xtr, ytr = dataset(train, target, tokens)
    xte, yte = dataset(test, target, tokens)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, C=0.1).fit((xtr - mean) / std, ytr)
    acc = float((clf.predict((xte - mean) / std) == yte).mean())
    values, counts = np.unique(ytr, return_counts=True)
    prior = float((yte == values[counts.argmax()]).mean())  # the most frequent training label
    return {"target": target, "tokens": tokens, "accuracy": acc, "prior": prior, "n_test": len(yte)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset whose (pretrained) tower is probed")
    p.add_argument("--train-n", type=int, default=300, help="train-split scenes to fit the probes on")
    p.add_argument("--test-n", type=int, default=100, help="test-split scenes to score them on")
    p.add_argument("--tokens", default="576,36", help="budgets to probe at, comma-separated")
    p.add_argument("--out", default="dev/results", help="folder for tower_probe_<preset>.{json,md}")
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    budgets = [int(t) for t in args.tokens.split(",")]
    bad = [t for t in budgets if t not in cfg.budgets]
    if bad:
        p.error(f"--tokens {bad} not among the preset's budgets {list(cfg.budgets)}")
    tower = build_tower(cfg.vision, pretrained=True).eval()  # loaded once for both splits
    train, test = grids(cfg, tower, "train", args.train_n), grids(cfg, tower, "test", args.test_n)
    rows = [probe(train, test, target, t) for t in budgets for target in TARGETS]
    rep = {"preset": args.preset, "train_n": args.train_n, "test_n": args.test_n, "rows": rows}
    md = [
        f"# Linear probes on the frozen `{args.preset}` tower ({args.train_n} train / {args.test_n} test scenes)",
        "",
        "Accuracy (%) of a logistic regression on the grid features under each object's box",
        f"(`python dev/tower_probe.py --preset {args.preset}`); prior: the most frequent label.",
        "",
        "| tokens | target | probe | prior | n |",
        "|---|---|---|---|---|",
        *(
            f"| {r['tokens']} | {r['target']} | {100 * r['accuracy']:.1f} | {100 * r['prior']:.1f} | {r['n_test']} |"
            for r in rows
        ),
    ]
    out = Path(args.out)
    atomic.write_json(out / f"tower_probe_{args.preset}.json", rep)
    atomic.write_text(out / f"tower_probe_{args.preset}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
