"""Scoring: the answer rule, and the best constant answer per category."""

from __future__ import annotations

from collections import Counter

from fmvr.tasks.clip import clips
from fmvr.tasks.scene import CATEGORIES, CLIP_CATEGORY, scenes


def constant_baseline(
    split: str = "test", n: int = 100, seed: int = 0, n_clips: int = 0
) -> dict[str, tuple[str, float]]:
    """The best constant answer per category on the first n scenes of a split, and its accuracy:
    {category: (answer, accuracy)}, plus "all" (the mean over the five) and, with n_clips > 0, the
    frames category on that many clips. A model that does not look at the image scores at most
    this, so it is the line a trained model has to clear."""
    answers: dict[str, Counter] = {c: Counter() for c in CATEGORIES}
    for scene in scenes(split, n, seed):
        for c, _, a in scene.questions:
            answers[c][a] += 1
    out = {}
    for c, counts in answers.items():
        best, hits = counts.most_common(1)[0]
        out[c] = (best, hits / sum(counts.values()))
    out["all"] = ("", sum(acc for _, acc in out.values()) / len(CATEGORIES))
    if n_clips:
        counts = Counter(a for clip in clips(split, n_clips, seed) for _, _, a in clip.questions)
        best, hits = counts.most_common(1)[0]
        out[CLIP_CATEGORY] = (best, hits / sum(counts.values()))
    return out


def score(answer_text: str, target: str) -> bool:
    """Exact match after lower-casing and stripping spaces and a final full stop."""
    return answer_text.strip().lower().rstrip(".").strip() == target.lower()
