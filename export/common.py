"""Shared pieces of the export commands: the model source, errors, images, progress, versions."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import BundleError

TRAIN_HINT = (
    "train one with `python -m train ...` (it writes a checkpoint directory), or import released "
    "weights with fmvr.checkpoint.import_llava_hf / import_authors and save_checkpoint; "
    "or pass --demo-tiny to export an UNTRAINED tiny model (for trying the plumbing only)"
)


class ExportError(RuntimeError):
    """An export that cannot go on: what was wrong and what to do."""


USER_ERRORS = (ExportError, BundleError)


@dataclass
class Source:
    """The model to export and where it came from."""

    model: Any  # fmvr.model.FMVRLlava, eval mode
    tokenizer: Any  # tokenizers.Tokenizer
    label: str  # checkpoint path or "demo-tiny (untrained, seed N)"
    flags: tuple[str, ...]  # the source as command-line flags: --checkpoint PATH | --demo-tiny [--seed N]


def load_source(checkpoint: str | None, demo_tiny: bool, seed: int = 0) -> Source:
    if checkpoint and demo_tiny:
        raise ExportError("pass either --checkpoint or --demo-tiny, not both")
    if demo_tiny:
        return tiny_source(seed)
    if not checkpoint:
        raise ExportError(f"no --checkpoint given: {TRAIN_HINT}")
    return checkpoint_source(checkpoint)


def tiny_source(seed: int = 0) -> Source:
    from fmvr.config import preset
    from fmvr.model import build_model
    from fmvr.tokenizer import build_tiny_tokenizer

    print(
        f"[source] demo-tiny: the tiny preset with random weights (seed {seed}); UNTRAINED, answers are noise"
    )
    model = build_model(preset("tiny"), seed=seed)
    flags = ("--demo-tiny",) if seed == 0 else ("--demo-tiny", "--seed", str(seed))
    return Source(model, build_tiny_tokenizer(), f"demo-tiny (untrained, seed {seed})", flags)


def checkpoint_source(path: str) -> Source:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ExportError(
            f"checkpoint {path} not found (expected a directory with config.json): {TRAIN_HINT}"
        )
    from fmvr.checkpoint import load_checkpoint
    from fmvr.tokenizer import load_tokenizer

    if not (p / "tokenizer.json").is_file():
        raise ExportError(
            f"checkpoint {path} has no tokenizer.json; the bundle needs it: "
            "save the checkpoint with fmvr.checkpoint.save_checkpoint(model, path, tokenizer=tok)"
        )
    print(f"[source] checkpoint {path}")
    return Source(load_checkpoint(p).eval(), load_tokenizer(p), str(p), ("--checkpoint", str(p)))


def parse_tokens(spec: str, budgets: tuple[int, ...]) -> tuple[int, ...]:
    """'all' | '36' | '1,9,36' -> budgets of the model, largest first (fmvr.cli.parse_tokens,
    the one parser every command shares); an unknown budget is an ExportError."""
    from fmvr.cli import parse_tokens as parse

    try:
        return parse(spec, sorted(budgets, reverse=True))
    except ValueError as e:
        raise ExportError(str(e)) from None


# ---- images for parity checks --------------------------------------------------------------------


def parity_images() -> tuple[list[Any], list[str]]:
    """Real photos (scikit-learn's bundled samples, when installed) plus built-in images."""
    from PIL import Image

    images, names = [], []
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        print("[parity] scikit-learn not installed: parity on the built-in images only")
    else:
        for name in ("china.jpg", "flower.jpg"):
            images.append(Image.fromarray(load_sample_image(name)))
            names.append(f"sklearn:{name}")
    yy, xx = np.mgrid[0:240, 0:320]  # [H, W]
    grad = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) % 256], -1).astype(np.uint8)  # [H, W, 3]
    images.append(Image.fromarray(grad))
    names.append("builtin:gradient-320x240")
    check = ((xx // 20 + yy // 20) % 2 * 255).astype(np.uint8)  # [H, W]
    images.append(Image.fromarray(check).convert("RGB").transpose(Image.Transpose.ROTATE_90))
    names.append("builtin:checker-240x320")
    return images, names


def frame_parity_images() -> tuple[list[Any], list[str]]:
    """parity_images() plus odd aspect ratios cut from the photos: a 640x360 (16:9) crop and a
    200x500 portrait crop (width x height), for the in-graph preprocessing's parity."""
    from PIL import Image

    images, names = parity_images()
    photos = [im for im, n in zip(images, names) if n.startswith("sklearn:")]
    if photos:
        images.append(photos[0].crop((0, 0, 640, 360)))
        names.append("sklearn:china.jpg[crop 640x360]")
        portrait = photos[-1].transpose(Image.Transpose.ROTATE_90)  # 427 x 640
        images.append(portrait.crop((100, 60, 300, 560)))
        names.append("sklearn:flower.jpg[rotated, crop 200x500]")
    return images, names


def pixels_for(cfg: Any, images: list[Any]) -> np.ndarray:
    """Images through fmvr.preprocess with the model's settings: float32 [N, 3, S, S]."""
    from fmvr.preprocess import Preprocessor

    return Preprocessor.from_config(cfg)(images)


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max abs error and cosine similarity of two tensors (flattened, float64)."""
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cos = float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-30)
    return {"max_abs": float(np.abs(a - b).max()), "cosine": cos, "ref_max_abs": float(np.abs(a).max())}


# ---- progress and versions -------------------------------------------------------------------------


class Progress:
    """`[2/5] vision export ... done (6.1 s)` lines."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, 0.0

    def start(self, what: str) -> None:
        self.n += 1
        self.t0 = time.perf_counter()
        print(f"[{self.n}/{self.total}] {what} ...", flush=True)

    def done(self, note: str = "") -> None:
        dt = time.perf_counter() - self.t0
        print(f"[{self.n}/{self.total}] done in {dt:.1f} s{'  ' + note if note else ''}", flush=True)


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": sys.platform}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
