"""Scoring: the answer rule, the best constant answer per category (fit on the training split),
and the paired bootstrap interval of a difference between two arms."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from fmvr.tasks.clip import clips
from fmvr.tasks.scene import CLIP_CATEGORY
from fmvr.tasks.variants import categories, scenes

FIT_N = 500  # training-split scenes the constant answers are fit on


def constant_baseline(
    split: str = "test",
    n: int = 100,
    seed: int = 0,
    n_clips: int = 0,
    variant: str = "easy",
    fit_n: int = FIT_N,
) -> dict[str, tuple[str, float]]:
    """The best constant answer per category, chosen on the training split's answer distribution
    (fit_n scenes), and its accuracy on the first n scenes of `split`: {category: (answer,
    accuracy)}, plus "all" (the mean over the categories) and, with n_clips > 0, the frames
    category on that many clips. A model that does not look at the image scores about this,
    so it is the line a trained model has to clear; choosing the answer on the scored scenes
    themselves would flatter it."""
    cats = categories(variant)
    seen: dict[str, Counter] = {c: Counter() for c in cats}
    for scene in scenes("train", fit_n, seed, variant):
        for c, _, a in scene.questions:
            seen[c][a] += 1
    best = {c: counts.most_common(1)[0][0] for c, counts in seen.items()}
    hits: dict[str, list[bool]] = {c: [] for c in cats}
    for scene in scenes(split, n, seed, variant):
        for c, _, a in scene.questions:
            hits[c].append(a == best[c])
    out = {c: (best[c], float(np.mean(hits[c]))) for c in cats}
    out["all"] = ("", float(np.mean([acc for _, acc in out.values()])))
    if n_clips:
        fit = Counter(a for clip in clips("train", fit_n, seed) for _, _, a in clip.questions).most_common(1)[
            0
        ][0]
        got = [a == fit for clip in clips(split, n_clips, seed) for _, _, a in clip.questions]
        out[CLIP_CATEGORY] = (fit, float(np.mean(got)))
    return out


def score(answer_text: str, target: str) -> bool:
    """Exact match after lower-casing and stripping spaces and a final full stop."""
    return answer_text.strip().lower().rstrip(".").strip() == target.lower()


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the percentile interval of the mean difference, resampling
    units (scenes) with replacement, so a[i] and b[i] must be the same scene under two arms
    (e.g. its fraction of questions answered right). b None: the interval of mean(a) itself."""
    d = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(
            f"paired_bootstrap needs two equal-length, non-empty score lists, got shape {d.shape}"
        )
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)  # [n_boot]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)
