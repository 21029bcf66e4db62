"""Does a checkpoint use the image? Its loss on held-out benchmark text with each scene's own
image vs with another scene's image (the image list rolled by one), per budget.

    python dev/image_use.py --checkpoint runs/long/stage1/final --kind caption --tokens 36,9
    python dev/image_use.py --checkpoint runs/demo/train/final --kind qa

A model that reads the image scores a lower loss with the right image; one that answers from
the text alone (the answer priors) scores the same with either: gap ~ 0. Writes
<out>/image_use_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmvr import atomic  # noqa: E402
from fmvr.checkpoint import load_checkpoint  # noqa: E402
from fmvr.cli import parse_tokens  # noqa: E402
from fmvr.tokenizer import load_tokenizer  # noqa: E402
from train.data import BenchDataset, collate  # noqa: E402
from train.loss import matryoshka_loss  # noqa: E402


@torch.no_grad()
def losses(model, data: BenchDataset, budgets: tuple[int, ...], batch: int, shift: int) -> dict[int, float]:
    """Token-mean loss per budget, each example paired with the image of example i + shift."""
    n = len(data)
    sums = dict.fromkeys(budgets, 0.0)
    count = 0
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        examples = [data.example(i) for i in idx]
        pixels = [p for i in idx for p in data.images((i + shift) % n)]
        b = collate(examples, pixels, model.cfg, budgets)
        k = b.num_targets()
        for t in budgets:
            _, parts = matryoshka_loss(model, b, (t,))
            sums[t] += parts[t] * k
        count += k
    return {t: s / count for t, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument(
        "--kind", default="qa", choices=("qa", "caption"), help="stage-2 questions or stage-1 captions"
    )
    p.add_argument("--tokens", default="all", help="budgets, comma-separated, or all")
    p.add_argument("--n", type=int, default=64, help="held-out (val split) scenes")
    p.add_argument("--batch-size", type=int, default=8, help="scenes per forward")
    p.add_argument("--out", default="dev/results", help="folder for image_use_<name>.{json,md}")
    p.add_argument("--name", default="", help="result name (default: the checkpoint's parent folder)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint).eval()
    tok = load_tokenizer(args.checkpoint)
    budgets = parse_tokens(args.tokens, model.cfg.budgets)
    template = "plain" if args.kind == "caption" else model.cfg.template
    data = BenchDataset("val", args.n, tok, model.cfg, template, kind=args.kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        right = losses(model, data, budgets, args.batch_size, 0)
        wrong = losses(model, data, budgets, args.batch_size, 1)
    rows = [{"tokens": t, "loss_right_image": right[t], "loss_other_image": wrong[t]} for t in budgets]
    name = args.name or Path(args.checkpoint).resolve().parent.name
    rep = {"checkpoint": args.checkpoint, "kind": args.kind, "n": args.n, "split": "val", "rows": rows}
    md = [
        f"# Image use: {name} ({args.kind}, {args.n} val scenes)",
        "",
        "Loss in nats per target token with each scene's own image vs another scene's image.",
        "A gap near 0 means the model answers without looking.",
        "",
        "| tokens | right image | other image | gap |",
        "|---|---|---|---|",
        *(
            f"| {r['tokens']} | {r['loss_right_image']:.3f} | {r['loss_other_image']:.3f} | "
            f"{r['loss_other_image'] - r['loss_right_image']:+.3f} |"
            for r in rows
        ),
    ]
    out = Path(args.out)
    atomic.write_json(out / f"image_use_{name}.json", rep)
    atomic.write_text(out / f"image_use_{name}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}/image_use_{name}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
