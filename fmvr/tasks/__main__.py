"""`python -m fmvr.tasks`: write the built-in benchmark in LLaVA format."""

from __future__ import annotations

from pathlib import Path

from fmvr.tasks.llava import write_llava
from fmvr.tasks.scene import SPLIT_SEEDS


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fmvr.tasks", description="Write the built-in benchmark in LLaVA format."
    )
    p.add_argument("--out", required=True, help="folder for images/ and <split>-<kind>.json")
    p.add_argument("--split", default="train", choices=sorted(SPLIT_SEEDS), help="which split")
    p.add_argument("--bench-n", type=int, default=100, help="number of scenes")
    p.add_argument("--bench-seed", type=int, default=0, help="benchmark seed")
    p.add_argument(
        "--kind",
        default="qa",
        choices=("qa", "questions", "caption"),
        help="qa: one multi-turn conversation of ~20 questions per scene (stage 2); questions: one record per question "
        "(with category/answer, for scoring); caption: plain captions (stage 1)",
    )
    args = p.parse_args(argv)
    path = write_llava(args.out, args.split, args.bench_n, args.bench_seed, args.kind)
    print(f"wrote {path} ({args.bench_n} scenes, images under {Path(args.out) / 'images'})")
    print(f"next: python -m train --data {path} --image-folder {args.out} --out runs/llava-format")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
