"""Scene records of the built-in benchmark: layout, objects, digit card, questions and their
answers, the words covering each cell (the ground stage's targets), and the splits. No pixels
(render.py) and no torch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

SIZE = 336
CELL = SIZE // 3  # 112 px
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
REGIONS = {  # name -> cell (row, col)
    "top left": (0, 0),
    "top right": (0, 2),
    "bottom left": (2, 0),
    "bottom right": (2, 2),
    "center": (1, 1),
}
CELL_NAMES = {  # every cell of the layout grid, for captions
    (r, c): f"{row} {col}".strip() if (row, col) != ("", "") else "center"
    for r, row in enumerate(("top", "", "bottom"))
    for c, col in enumerate(("left", "", "right"))
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
DESCRIBE = "Describe the image."  # the question of a caption block (training kind "mix")
CATEGORIES = ("colour", "count", "region", "exist", "digit")  # one image each; "all" is over these
CLIP_CATEGORY = "frames"  # two-frame clips, scored apart from "all"
APPEARED = "Which object appeared in the second frame?"
CLIP_INDEX = 5_000_000  # clip i of a split is built on scene index CLIP_INDEX + i (never a plain scene's)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col) in the 3x3 layout
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[Obj, ...]
    background: str
    digit: int | None = None  # the digit card (the easy variant; the detail variant has none)
    digit_index: int | None = None  # index into load_digits
    digit_cell: tuple[int, int] | None = None
    digit_box: tuple[int, int, int, int] | None = None
    variant: str = "easy"  # "easy" (this module) | "detail" (fmvr.tasks.detail)
    questions: tuple[tuple[str, str, str], ...] = field(default=())  # (category, question, answer)


# ---- scenes ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn, no download
    return d.images.astype(np.float32), d.target.astype(np.int64)  # [1797, 8, 8] in 0..16, [1797]


def make_scene(seed: int) -> Scene:
    """The scene record for `seed` (layout, objects, digit, questions); no pixels."""
    rng = random.Random(seed)
    cells = [(r, c) for r in range(3) for c in range(3)]
    rng.shuffle(cells)
    n = rng.randint(2, 4)
    shapes = rng.sample(SHAPES, n)
    objects = []
    for shape, cell in zip(shapes, cells[:n]):
        objects.append(Obj(shape, rng.choice(list(COLOURS)), cell, _box(rng, cell, rng.randint(56, 92))))
    images, targets = digit_scans()
    index = rng.randrange(len(targets))
    dcell = cells[n]
    scene = Scene(
        seed=seed,
        objects=tuple(objects),
        digit=int(targets[index]),
        digit_index=index,
        digit_cell=dcell,
        digit_box=_box(rng, dcell, 44),
        background=rng.choice(("gradient", "stripes", "noise")),
    )
    return Scene(**{**_fields(scene), "questions": tuple(make_questions(scene, rng))})


def _fields(scene: Scene) -> dict:
    return {k: getattr(scene, k) for k in scene.__dataclass_fields__}


def _box(rng: random.Random, cell: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    r, c = cell
    slack = CELL - size
    x0 = c * CELL + rng.randint(2, slack - 2)
    y0 = r * CELL + rng.randint(2, slack - 2)
    return (x0, y0, x0 + size, y0 + size)


def make_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """One question per category in random order, answers derived from the record."""
    obj = rng.choice(scene.objects)
    colour = rng.choice(list(COLOURS))
    occupied = [name for name, cell in REGIONS.items() if any(o.cell == cell for o in scene.objects)]
    region = rng.choice(occupied) if occupied and rng.random() < 0.75 else rng.choice(list(REGIONS))
    if rng.random() < 0.5:  # present object
        probe = rng.choice(scene.objects)
        shape, pcolour = probe.shape, probe.colour
    else:  # absent: a present shape in another colour, or an absent shape (POPE's adversarial/random)
        shape = rng.choice(SHAPES)
        pcolour = rng.choice(
            [c for c in COLOURS if (shape, c) not in {(o.shape, o.colour) for o in scene.objects}]
        )
    qs = [
        ("colour", f"What colour is the {obj.shape}?", answer(scene, "colour", obj.shape)),
        ("count", f"How many {colour} objects are there?", answer(scene, "count", colour)),
        (
            "region",
            f"Which object is in the {region} corner?".replace("center corner", "center"),
            answer(scene, "region", region),
        ),
        (
            "exist",
            f"Is there a {pcolour} {shape} in the image?",
            answer(scene, "exist", f"{pcolour} {shape}"),
        ),
        ("digit", "What digit is written on the card?", answer(scene, "digit", "")),
    ]
    rng.shuffle(qs)  # a fixed order would let a model answer by turn position
    return qs


def training_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question a scene supports, shuffled (deterministic from the scene seed): the colour
    of each object, the count of each colour, the shape in each region, four existence probes
    (half absent) and the digit. ~20 answers per image make stage 2 learn about twice as fast
    per CPU second as the 5 evaluation questions alone (measured on the tiny preset)."""
    rng = random.Random(scene.seed * 31 + 7)
    qs = [("colour", f"What colour is the {o.shape}?", o.colour) for o in scene.objects]
    qs += [("count", f"How many {c} objects are there?", answer(scene, "count", c)) for c in COLOURS]
    qs += [("region", _region_question(r), answer(scene, "region", r)) for r in REGIONS]
    present = {(o.colour, o.shape) for o in scene.objects}
    for k in range(4):
        if k % 2 == 0:
            colour, shape = rng.choice(sorted(present))
        else:
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        qs.append(
            (
                "exist",
                f"Is there a {colour} {shape} in the image?",
                answer(scene, "exist", f"{colour} {shape}"),
            )
        )
    qs.append(("digit", "What digit is written on the card?", str(scene.digit)))
    rng.shuffle(qs)
    return qs


def _region_question(region: str) -> str:
    return f"Which object is in the {region} corner?".replace("center corner", "center")


def answer(scene: Scene, category: str, arg: str) -> str:
    """The correct single-word answer of a question about `scene`."""
    if category == "colour":
        return next(o.colour for o in scene.objects if o.shape == arg)
    if category == "count":
        return NUMBERS[sum(o.colour == arg for o in scene.objects)]
    if category == "region":
        cell = REGIONS[arg]
        return next((o.shape for o in scene.objects if o.cell == cell), "none")
    if category == "exist":
        colour, shape = arg.split(" ")
        return "yes" if any(o.colour == colour and o.shape == shape for o in scene.objects) else "no"
    if category == "digit":
        return str(scene.digit)
    raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")


def caption(scene: Scene) -> str:
    """A plain stage-1 caption: the objects in reading order (row by row), each with its colour
    and cell, then the digit. Reading order makes every word predictable from the image: with
    the objects in random order the first colour could be any object's, which teaches the
    answer prior rather than looking."""
    objects = sorted(scene.objects, key=lambda o: o.cell)
    parts = [
        f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}"
        for o in objects
    ]
    return ", ".join(parts) + f" and a card with the digit {scene.digit}."


def cell_words(scene: Scene, side: int, position: bool = False, digit: bool = True) -> list[tuple[str, ...]]:
    """What covers each cell of a side x side grid laid over the image (row-major), as words: the
    colour and shape of the object whose box (grown by GROW px) holds the cell's centre, ("card",
    digit) for the digit card (("card",) without `digit`), else ("empty",). With `position`, the words naming the layout cell
    the centre falls in follow ("top", "left"; "center"). The grounding stage's targets
    (train.ground) and the oracle grid of dev/caption_qa.py are built from these."""
    size = SIZE / side
    out = []
    for r in range(side):
        for c in range(side):
            centre = ((c + 0.5) * size, (r + 0.5) * size)
            hit = [o for o in scene.objects if covers(o.box, centre)]
            if hit:
                words: tuple[str, ...] = (hit[0].colour, hit[0].shape)
            elif scene.digit_box is not None and covers(scene.digit_box, centre):
                words = ("card", str(scene.digit)) if digit else ("card",)
            else:
                words = ("empty",)
            if position:
                words += tuple(CELL_NAMES[(int(centre[1] // CELL), int(centre[0] // CELL))].split())
            out.append(words)
    return out


GROW = 8.0  # px an object's box is grown by when asking what covers a point


def covers(box: tuple[int, int, int, int], point: tuple[float, float], margin: float = GROW) -> bool:
    """Whether `point` (x, y) lies in `box` (x0, y0, x1, y1) grown by `margin` px."""
    return box[0] - margin <= point[0] <= box[2] + margin and box[1] - margin <= point[1] <= box[3] + margin


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    return (seed * 1_000_003 + SPLIT_SEEDS[split]) * 10_000_019 + index


def scenes(split: str, n: int, seed: int = 0) -> Iterator[Scene]:
    """The first n scenes of a split; splits never share a seed."""
    for i in range(n):
        yield make_scene(scene_seed(split, i, seed))
