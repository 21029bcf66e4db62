"""The built-in visual benchmark: synthetic scenes, deterministic from a seed, no download.
Torch-free (numpy, PIL and scikit-learn's bundled digits), so train/, runtime/ (the budget
card), benchmarks/ and dev/ all import it. `python -m fmvr.tasks` writes it in LLaVA format.

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

Modules: scene.py (records, questions, answers, cell words, splits), clip.py, render.py
(pixels), scoring.py (the answer rule, constant baselines), llava.py (LLaVA-format records).
"""

from fmvr.tasks.clip import Clip, clip_training_questions, clips, make_clip
from fmvr.tasks.llava import llava_records, write_llava
from fmvr.tasks.render import render_scene
from fmvr.tasks.scene import (
    APPEARED,
    CATEGORIES,
    CELL,
    CELL_NAMES,
    CLIP_CATEGORY,
    COLOURS,
    DESCRIBE,
    GROW,
    NUMBERS,
    REGIONS,
    SHAPES,
    SIZE,
    SPLIT_SEEDS,
    Obj,
    Scene,
    answer,
    covers,
    make_questions,
    scene_seed,
)
from fmvr.tasks.scoring import constant_baseline, paired_bootstrap, score
from fmvr.tasks.variants import (
    VARIANTS,
    caption,
    categories,
    cell_words,
    check_variant,
    make_scene,
    scenes,
    training_questions,
)

__all__ = [
    "APPEARED",
    "CATEGORIES",
    "CELL",
    "CELL_NAMES",
    "CLIP_CATEGORY",
    "COLOURS",
    "Clip",
    "DESCRIBE",
    "GROW",
    "NUMBERS",
    "Obj",
    "REGIONS",
    "SHAPES",
    "SIZE",
    "SPLIT_SEEDS",
    "Scene",
    "VARIANTS",
    "answer",
    "caption",
    "categories",
    "cell_words",
    "check_variant",
    "clip_training_questions",
    "clips",
    "constant_baseline",
    "covers",
    "llava_records",
    "make_clip",
    "make_questions",
    "make_scene",
    "paired_bootstrap",
    "render_scene",
    "scene_seed",
    "scenes",
    "score",
    "training_questions",
    "write_llava",
]
