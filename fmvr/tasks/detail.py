"""The `detail` variant of the built-in benchmark: many small objects, so pooling dilutes them.

A scene is a 336x336 image on a plain grey background with 10-16 objects of 12-28 px (14-32 px
at the `small` preset's 384 px input), placed anywhere without overlap. At 576 tokens (a 24x24
grid) an object spans one to three tokens; at 9 tokens one token averages a 112 px window that
holds one to three objects and mostly background, so a small object's colour and shape are
diluted: the budget buys accuracy (`benchmarks/detail_probe.py` checks it on the frozen tower).

Each scene has one shape that occurs once (the "singleton shape") and one colour that occurs
once, so "the triangle" and "the red object" name one object. Questions (single-word answers,
or a layout cell's name):
    colour  "What colour is the triangle?"                 -> "red"
    shape   "What shape is the red object?"                -> "circle" | "square" | ...
    count   "How many blue objects are there?"             -> "zero".."fifteen" (mostly one to four)
    where   "Where is the triangle?"                       -> "top left" | "top" | ... | "center"
    exist   "Is there a green square in the image?"        -> "yes" | "no" (half absent)
Every category needs a small object resolved, so all five are detail categories.
"""

from __future__ import annotations

import random

from fmvr.tasks.scene import CELL, CELL_NAMES, COLOURS, NUMBERS, SIZE, Obj, Scene

SHAPES = ("circle", "square", "triangle", "cross")  # shapes that stay distinct at 12 px
SIZES = (12, 28)  # px, inclusive, at the 336 px render
OBJECTS = (10, 16)  # objects per scene, inclusive
GAP = 3  # px kept free around every object
CATEGORIES = ("colour", "shape", "count", "where", "exist")
COUNT_WORDS = (
    *NUMBERS,
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
)


def make_scene(seed: int) -> Scene:
    """The detail scene record for `seed` (objects, questions); no pixels."""
    rng = random.Random(seed)
    lone_shape = rng.choice(SHAPES)
    lone_colour = rng.choice(list(COLOURS))
    other_shapes = [s for s in SHAPES if s != lone_shape]
    other_colours = [c for c in COLOURS if c != lone_colour]
    n = rng.randint(*OBJECTS)
    kinds = [(lone_shape, rng.choice(other_colours)), (rng.choice(other_shapes), lone_colour)]
    kinds += [(rng.choice(other_shapes), rng.choice(other_colours)) for _ in range(n - 2)]
    rng.shuffle(kinds)
    objects: list[Obj] = []
    for shape, colour in kinds:
        box = _free_box(rng, [o.box for o in objects], rng.randint(*SIZES))
        objects.append(Obj(shape, colour, _cell_of(box), box))
    scene = Scene(seed=seed, objects=tuple(objects), background="grey", variant="detail")
    return Scene(**{**_fields(scene), "questions": tuple(make_questions(scene, rng))})


def _fields(scene: Scene) -> dict:
    return {k: getattr(scene, k) for k in scene.__dataclass_fields__}


def _free_box(
    rng: random.Random, taken: list[tuple[int, int, int, int]], size: int
) -> tuple[int, int, int, int]:
    """A size x size box inside the image, GAP px clear of every box in `taken`."""
    for _ in range(1000):
        x0, y0 = rng.randint(GAP, SIZE - GAP - size), rng.randint(GAP, SIZE - GAP - size)
        box = (x0, y0, x0 + size, y0 + size)
        if not any(_overlap(box, t, GAP) for t in taken):
            return box
    raise RuntimeError(f"no free place for a {size} px object among {len(taken)}")  # never at 16 objects


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _cell_of(box: tuple[int, int, int, int]) -> tuple[int, int]:
    """The 3x3 layout cell (row, col) holding the box's centre."""
    return (int((box[1] + box[3]) / 2 // CELL), int((box[0] + box[2]) / 2 // CELL))


def singletons(scene: Scene) -> tuple[Obj, Obj]:
    """(the object of the shape that occurs once, the object of the colour that occurs once)."""
    shape = next(o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1)
    colour = next(o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1)
    return shape, colour


def answer(scene: Scene, category: str, arg: str) -> str:
    """The correct answer of a question about a detail scene."""
    if category == "colour":
        return next(o.colour for o in scene.objects if o.shape == arg)
    if category == "shape":
        return next(o.shape for o in scene.objects if o.colour == arg)
    if category == "count":
        return COUNT_WORDS[sum(o.colour == arg for o in scene.objects)]
    if category == "where":
        return CELL_NAMES[next(o.cell for o in scene.objects if o.shape == arg or o.colour == arg)]
    if category == "exist":
        colour, shape = arg.split(" ")
        return "yes" if any(o.colour == colour and o.shape == shape for o in scene.objects) else "no"
    raise ValueError(f"unknown detail category {category!r}; choose one of {CATEGORIES}")


def _exist_probe(scene: Scene, rng: random.Random, present: bool) -> tuple[str, str, str]:
    have = sorted({(o.colour, o.shape) for o in scene.objects})
    if present:
        colour, shape = rng.choice(have)
    else:
        colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in have])
    return (
        "exist",
        f"Is there a {colour} {shape} in the image?",
        answer(scene, "exist", f"{colour} {shape}"),
    )


def make_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """One question per category in random order."""
    lone_shape, lone_colour = singletons(scene)
    counted = rng.choice(list(COLOURS))
    qs = [
        ("colour", f"What colour is the {lone_shape.shape}?", lone_shape.colour),
        ("shape", f"What shape is the {lone_colour.colour} object?", lone_colour.shape),
        ("count", f"How many {counted} objects are there?", answer(scene, "count", counted)),
        ("where", f"Where is the {lone_shape.shape}?", CELL_NAMES[lone_shape.cell]),
        _exist_probe(scene, rng, present=rng.random() < 0.5),
    ]
    rng.shuffle(qs)  # a fixed order would let a model answer by turn position
    return qs


def training_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question a detail scene supports, shuffled (deterministic from its seed): the
    singletons' colour, shape and place, the count of each colour, four existence probes."""
    rng = random.Random(scene.seed * 31 + 7)
    lone_shape, lone_colour = singletons(scene)
    qs = [
        ("colour", f"What colour is the {lone_shape.shape}?", lone_shape.colour),
        ("shape", f"What shape is the {lone_colour.colour} object?", lone_colour.shape),
        ("where", f"Where is the {lone_shape.shape}?", CELL_NAMES[lone_shape.cell]),
        ("where", f"Where is the {lone_colour.colour} object?", CELL_NAMES[lone_colour.cell]),
    ]
    qs += [("count", f"How many {c} objects are there?", answer(scene, "count", c)) for c in COLOURS]
    qs += [_exist_probe(scene, rng, present=k % 2 == 0) for k in range(4)]
    rng.shuffle(qs)
    return qs


def caption(scene: Scene) -> str:
    """The objects in reading order (row by row of the layout, then left to right)."""
    objects = sorted(scene.objects, key=lambda o: (o.cell, o.box[0]))
    return ", ".join(f"a {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}" for o in objects) + "."


def cell_words(scene: Scene, side: int) -> list[tuple[str, ...]]:
    """Per token window of a side x side grid (row-major), the colour and shape of EVERY object
    whose box intersects the window (reading order), else ("empty",): the ground stage's targets."""
    size = SIZE / side
    out = []
    for r in range(side):
        for c in range(side):
            x0, y0 = c * size, r * size
            hit = [
                o
                for o in scene.objects
                if o.box[0] < x0 + size and x0 < o.box[2] and o.box[1] < y0 + size and y0 < o.box[3]
            ]
            words = tuple(
                w for o in sorted(hit, key=lambda o: (o.box[1], o.box[0])) for w in (o.colour, o.shape)
            )
            out.append(words or ("empty",))
    return out
