"""The benchmark's variants behind one set of names (what train/, runtime/ and benchmarks/ call):

    easy    3x3 layout of 2-4 objects of 56-92 px and a digit card (fmvr.tasks.scene): every
            question is answerable at 9 tokens, so budgets tie (the demo's first benchmark)
    detail  10-16 objects of 12-28 px anywhere (fmvr.tasks.detail): pooling dilutes them, so
            the budget buys accuracy

A scene record carries its variant, so the functions of a scene dispatch on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import fmvr.tasks.detail as detail
import fmvr.tasks.scene as easy
from fmvr.tasks.scene import Scene, scene_seed

VARIANTS = ("easy", "detail")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def categories(variant: str = "easy") -> tuple[str, ...]:
    """The scored single-image categories of a variant ("all" is their mean)."""
    return detail.CATEGORIES if check_variant(variant) == "detail" else easy.CATEGORIES


def make_scene(seed: int, variant: str = "easy") -> Scene:
    return detail.make_scene(seed) if check_variant(variant) == "detail" else easy.make_scene(seed)


def scenes(split: str, n: int, seed: int = 0, variant: str = "easy") -> Iterator[Scene]:
    """The first n scenes of a split; splits never share a scene seed (fmvr.tasks.scene.scene_seed)."""
    check_variant(variant)
    for i in range(n):
        yield make_scene(scene_seed(split, i, seed), variant)


def training_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the scene supports, shuffled (deterministic from its seed)."""
    return detail.training_questions(scene) if scene.variant == "detail" else easy.training_questions(scene)


def caption(scene: Scene) -> str:
    return detail.caption(scene) if scene.variant == "detail" else easy.caption(scene)


def cell_words(scene: Scene, side: int, position: bool = False, digit: bool = True) -> list[tuple[str, ...]]:
    """The ground stage's targets: per token window of a side x side grid, the words of what
    covers it (easy: the object at the window's centre; detail: every object the window touches)."""
    if scene.variant == "detail":
        if position:
            raise ValueError(
                "--ground-position is an easy-variant option (its 3x3 layout); drop it with detail"
            )
        return detail.cell_words(scene, side)
    return easy.cell_words(scene, side, position, digit)
