"""Two-frame clips: the second frame is the first scene plus one object of a shape it lacks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from fmvr.tasks.scene import (
    APPEARED,
    CELL_NAMES,
    CLIP_CATEGORY,
    CLIP_INDEX,
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    _box,
    make_scene,
    scene_seed,
)


@dataclass(frozen=True)
class Clip:
    first: Scene
    second: Scene  # the first scene plus `added`
    added: Obj
    questions: tuple[tuple[str, str, str], ...]  # (category, question, answer), asked about both frames

    @property
    def seed(self) -> int:
        return self.first.seed

    @property
    def frames(self) -> tuple[Scene, Scene]:
        return (self.first, self.second)


def make_clip(seed: int) -> Clip:
    """The two-frame clip for `seed`: scene `seed`, then the same scene with one new object."""
    first = make_scene(seed)
    rng = random.Random(seed * 53 + 11)
    used = {o.cell for o in first.objects} | {first.digit_cell}
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]
    shape = rng.choice([s for s in SHAPES if s not in {o.shape for o in first.objects}])
    cell = rng.choice(free)
    added = Obj(shape, rng.choice(list(COLOURS)), cell, _box(rng, cell, rng.randint(56, 92)))
    second = replace(first, objects=(*first.objects, added), questions=())
    return Clip(first, second, added, ((CLIP_CATEGORY, APPEARED, shape),))


def clip_training_questions(clip: Clip) -> list[tuple[str, str, str]]:
    """What a clip supports, shuffled: the new object's shape, colour and cell, and for every
    object which frames show it ("both" or "the second")."""
    rng = random.Random(clip.seed * 37 + 5)
    new = clip.added
    qs = [
        (CLIP_CATEGORY, APPEARED, new.shape),
        (CLIP_CATEGORY, "What colour is the object that appeared in the second frame?", new.colour),
        (CLIP_CATEGORY, "Where is the object that appeared in the second frame?", CELL_NAMES[new.cell]),
    ]
    qs += [
        (CLIP_CATEGORY, f"Which frames show the {o.shape}?", "the second" if o is new else "both")
        for o in clip.second.objects
    ]
    rng.shuffle(qs)
    return qs


def clips(split: str, n: int, seed: int = 0) -> Iterator[Clip]:
    """The first n two-frame clips of a split (built on scenes no plain split index uses)."""
    for i in range(n):
        yield make_clip(scene_seed(split, CLIP_INDEX + i, seed))
