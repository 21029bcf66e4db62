"""`python -m fmvr.demo`: an FMVR model on one real photo, every budget.

Builds a preset (default `small`: pretrained EfficientNet-Lite0 at 384 px -> 24x24 grid ->
SmolLM2-135M, weights from pip packages; `tiny`: random tiny widths), runs one photo through
tower -> projector -> pyramid at each budget, and prints the token count, the output shape,
the time of that encode and the FLOPs per budget (of this model and of LLaVA-1.5-7B).
No downloads, no GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fmvr.config import PYRAMIDS


def _default_photo():
    try:
        from PIL import Image
        from sklearn.datasets import load_sample_image
    except ImportError as e:  # sklearn is in the `train` extra
        raise SystemExit(f"no default photo ({e}); pass --image PATH") from e
    return Image.fromarray(load_sample_image("china.jpg")), "scikit-learn sample china.jpg"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmvr.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, help="a photo (default: scikit-learn's bundled china.jpg)")
    ap.add_argument(
        "--preset", choices=("small", "tiny"), default="small", help="model preset (default small)"
    )
    ap.add_argument("--pyramid", choices=PYRAMIDS, default="fmvr", help="cascade (default fmvr)")
    ap.add_argument(
        "--prompt-tokens", type=int, default=40, help="text tokens for the FLOPs table (default 40)"
    )
    args = ap.parse_args(argv)

    import torch

    from fmvr.config import preset
    from fmvr.flops import budget_table, format_table
    from fmvr.model import build_model
    from fmvr.preprocess import Preprocessor, load_image

    cfg = preset(args.preset, pyramid=args.pyramid)
    model = build_model(cfg, seed=0)  # `small`: packaged pretrained tower and LM
    image, name = (load_image(args.image), str(args.image)) if args.image else _default_photo()
    pixels = torch.from_numpy(Preprocessor.from_config(cfg)([image]))  # [1, 3, S, S]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.name} FMVR model ({cfg.vision.tower} tower, {cfg.pyramid}, {n_params / 1e6:.2f} M params), "
        f"image: {name} {image.size}"
    )
    print(f"pixels {tuple(pixels.shape)} -> grid {cfg.grid}x{cfg.grid} -> budgets {list(cfg.budgets)}\n")
    print("| budget | output shape | encode ms | mean |x| |")
    print("|---:|---|---:|---:|")
    with torch.no_grad():
        model.encode_image(pixels, cfg.budgets[0])  # warm-up
        for t in cfg.budgets:
            start = time.perf_counter()
            out = model.encode_image(pixels, t)  # [1, T, D]
            ms = (time.perf_counter() - start) * 1e3
            assert out.shape == (1, t, cfg.text.hidden_size)
            print(f"| {t} | {tuple(out.shape)} | {ms:.1f} | {float(np.abs(out.numpy()).mean()):.3f} |")
    print(f"\nFLOPs per budget, {cfg.name} model, {args.prompt_tokens} prompt tokens:")
    print(format_table(budget_table(cfg, args.prompt_tokens)))
    big = preset("llava-1.5-7b", pyramid=args.pyramid)
    print(f"\nFLOPs per budget, llava-1.5-7b, {args.prompt_tokens} prompt tokens:")
    print(format_table(budget_table(big, args.prompt_tokens)))
    print("\nnext: python -m fmvr.flops --preset llava-1.5-7b --prompt-tokens 40 --json flops.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
