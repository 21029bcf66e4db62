"""The built-in visual benchmark: synthetic scenes, deterministic from a seed, no download.

A scene is a 336x336 image on a varied background (gradient, stripes or noise) with 2-4
coloured shapes and one white card with a real handwritten digit (scikit-learn's bundled
`load_digits` 8x8 scans, upscaled), each in its own cell of a 3x3 layout grid. Shapes in
one scene are distinct, so "the triangle" names one object.

Questions (single-word answers; exact match after lower-casing and stripping "."):
    colour  "What colour is the triangle?"                 -> "red"
    count   "How many blue objects are there?"             -> "zero".."three"
    region  "Which object is in the top left corner?"      -> "circle" | "none"
    exist   "Is there a green square in the image?"        -> "yes" | "no" (POPE-like, half absent)
    digit   "What digit is written on the card?"           -> "0".."9"
Digit and count need detail: the card is ~40 px (3 patches wide at 14 px), so they should
get harder as the visual budget shrinks.

A `Scene` record holds every object's cell, box, colour and shape: answers are derived from
it (and tests re-derive them from the record).

Two-frame clips (`Clip`, the "frames" category): the second frame is the first scene (same
background, objects and card, pixel for pixel) with one more object, of a shape the first
frame lacks, in an empty cell. Asked as two images in one question (`<image>\n<image>\n...`):
    frames  "Which object appeared in the second frame?"   -> "circle".."ring"
Only a model that compares the frames can answer: the new shape is one of the 2-4 the first
frame lacks, and the second frame alone shows all of its shapes alike.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fmvr import atomic

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
    digit: int
    digit_index: int  # index into load_digits
    digit_cell: tuple[int, int]
    digit_box: tuple[int, int, int, int]
    background: str
    questions: tuple[tuple[str, str, str], ...] = field(default=())  # (category, question, answer)


# ---- scenes ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
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
    images, targets = _digits()
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
    (train.ground) and the oracle grid of benchmarks/caption_qa.py are built from these."""
    size = SIZE / side
    out = []
    for r in range(side):
        for c in range(side):
            centre = ((c + 0.5) * size, (r + 0.5) * size)
            hit = [o for o in scene.objects if covers(o.box, centre)]
            if hit:
                words: tuple[str, ...] = (hit[0].colour, hit[0].shape)
            elif covers(scene.digit_box, centre):
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


# ---- pixels ----------------------------------------------------------------------------------


def render_scene(scene: Scene) -> Image.Image:
    """The 336x336 RGB image of a scene record (deterministic)."""
    rng = np.random.default_rng(scene.seed)
    img = Image.fromarray(_background(scene.background, rng))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o.shape, o.box, COLOURS[o.colour])
    x0, y0, x1, y1 = scene.digit_box
    img.paste(_digit_card(scene.digit_index, x1 - x0), (x0, y0))
    return img


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    lo, hi = sorted(rng.integers(60, 200, size=2))
    tint = rng.integers(-15, 16, size=3)  # a faint colour cast, never a palette colour
    if kind == "gradient":
        ramp = (
            np.linspace(lo, hi + 40, SIZE)[None, :]
            if rng.random() < 0.5
            else np.linspace(lo, hi + 40, SIZE)[:, None]
        )
        base = np.broadcast_to(ramp, (SIZE, SIZE))  # [H, W]
    elif kind == "stripes":
        period = int(rng.integers(12, 40))
        base = np.where((np.arange(SIZE)[:, None] + np.arange(SIZE)[None, :]) // period % 2, lo, hi)  # [H, W]
    else:
        base = rng.normal((lo + hi) / 2, 18, size=(SIZE, SIZE))  # [H, W]
    rgb = base[..., None] + tint[None, None, :]  # [H, W, 3]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((x0 + s * 0.1, y0 + s * 0.1, x1 - s * 0.1, y1 - s * 0.1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = s * 0.16
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(4, s // 7))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _digit_card(index: int, size: int) -> Image.Image:
    """A white card with the 8x8 scan upscaled (nearest) and drawn dark: [size, size] RGB."""
    images, _ = _digits()
    ink = images[index] / 16.0  # [8, 8] in 0..1
    cell = (size - 4) // 8
    up = np.kron(ink, np.ones((cell, cell)))  # [8*cell, 8*cell]
    card = np.full((size, size), 255.0)
    pad = (size - up.shape[0]) // 2
    card[pad : pad + up.shape[0], pad : pad + up.shape[1]] = 255.0 * (1.0 - up)
    return Image.fromarray(np.repeat(card[..., None], 3, axis=2).astype(np.uint8))  # [size, size, 3]


# ---- splits and LLaVA format -----------------------------------------------------------------


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    return (seed * 1_000_003 + SPLIT_SEEDS[split]) * 10_000_019 + index


def scenes(split: str, n: int, seed: int = 0) -> Iterator[Scene]:
    """The first n scenes of a split; splits never share a seed."""
    for i in range(n):
        yield make_scene(scene_seed(split, i, seed))


def llava_records(scene: Scene, image: str, kind: str) -> list[dict]:
    """LLaVA-format records for one scene: kind "qa" (one multi-turn conversation of every
    `training_questions`),
    "questions" (one record per question, with category/answer for scoring) or "caption"."""
    sid = f"bench-{scene.seed}"
    if kind == "caption":
        # "plain" drops the human text (the image alone); a chat template asks for the caption
        conv = [{"from": "human", "value": f"<image>\n{DESCRIBE}"}, {"from": "gpt", "value": caption(scene)}]
        return [{"id": sid, "image": image, "conversations": conv}]
    if kind == "questions":
        return [
            {
                "id": f"{sid}-{c}",
                "image": image,
                "category": c,
                "answer": a,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
            for c, q, a in scene.questions
        ]
    if kind == "qa":
        conv = []
        for i, (_, q, a) in enumerate(training_questions(scene)):
            prefix = "<image>\n" if i == 0 else ""
            conv += [{"from": "human", "value": f"{prefix}{q}"}, {"from": "gpt", "value": a}]
        return [{"id": sid, "image": image, "conversations": conv}]
    raise ValueError(f"unknown record kind {kind!r}; choose qa, questions or caption")


def write_llava(out_dir: str | Path, split: str, n: int, seed: int = 0, kind: str = "qa") -> Path:
    """Write n scenes of a split as <out_dir>/images/*.png + <out_dir>/<split>-<kind>.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for scene in scenes(split, n, seed):
        name = f"images/{split}-{scene.seed}.png"
        if not (out / name).exists():
            with atomic.open_atomic(out / name, "wb") as f:
                render_scene(scene).save(f, format="PNG")
        records += llava_records(scene, name, kind)
    path = out / f"{split}-{kind}.json"
    atomic.write_json(path, records, indent=1)
    return path


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


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m train.bench", description="Write the built-in benchmark in LLaVA format."
    )
    p.add_argument("--out", required=True, help="folder for images/ and <split>-<kind>.json")
    p.add_argument("--split", default="train", choices=sorted(SPLIT_SEEDS), help="which split")
    p.add_argument("--n", type=int, default=100, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed")
    p.add_argument(
        "--kind",
        default="qa",
        choices=("qa", "questions", "caption"),
        help="qa: one multi-turn conversation of ~20 questions per scene (stage 2); questions: one record per question "
        "(with category/answer, for scoring); caption: plain captions (stage 1)",
    )
    args = p.parse_args(argv)
    path = write_llava(args.out, args.split, args.n, args.seed, args.kind)
    print(f"wrote {path} ({args.n} scenes, images under {Path(args.out) / 'images'})")
    print(f"next: python -m train --data {path} --image-folder {args.out} --out runs/llava-format")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
