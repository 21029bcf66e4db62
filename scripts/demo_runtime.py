"""Step 4 of `make demo`: two held-out benchmark scenes, one question each, three deadlines.

    python scripts/demo_runtime.py OUT [VARIANT]       # VARIANT: detail (default) or easy

The two scenes (of the benchmark variant the demo trained on) share a shape named by the same
question, "What colour is the <shape>?", in different colours, so the answers can only come from
the image. Writes <out>/scene{0,1}.png and question{0,1}.txt; prints "TIGHT MID LOOSE" (ms) for
`python -m runtime ask --latency-ms`, chosen from this device's own predictions so the demo shows
three different choices on any machine: below the cheapest budget, between the 36- and
144-token budgets, and room for 576.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from fmvr.atomic import open_atomic, write_text
from fmvr.tasks import render_scene, scenes
from runtime import Pipeline


def named(scene) -> dict[str, str]:
    """{shape: colour} of the shapes that occur once in the scene (what "the <shape>" names)."""
    shapes = [o.shape for o in scene.objects]
    return {o.shape: o.colour for o in scene.objects if shapes.count(o.shape) == 1}


def two_scenes(variant: str):
    """The first two test scenes in which one shape occurs once, coloured differently."""
    pool = list(scenes("test", 24, variant=variant))
    for a, b in itertools.combinations(pool, 2):
        for shape, colour in named(a).items():
            if named(b).get(shape, colour) != colour:
                return (a, colour), (b, named(b)[shape]), shape
    raise RuntimeError("no two test scenes share a lone shape in different colours")


def main(out: Path, variant: str = "detail") -> int:
    *pair, shape = two_scenes(variant)
    question = f"What colour is the {shape}?"
    for k, (scene, colour) in enumerate(pair):
        image = out / f"scene{k}.png"
        with open_atomic(image, "wb") as f:
            render_scene(scene).save(f, format="PNG")
        write_text(out / f"question{k}.txt", question)
        print(f"image {image}: {question!r} (true answer: {colour})", file=sys.stderr)
    # no profile for this device (e.g. one saved before the key named the execution provider): measure it
    pipe = Pipeline.load(out / "bundle", profile_if_missing=True)
    for _ in range(2):  # the first request warms the sessions; use the second's predictions
        ms = pipe.ask(out / "scene0.png", question, latency_ms=1e9, max_new_tokens=1).candidates_ms
    budgets = sorted(ms)
    tight = 0.5 * ms[budgets[0]]
    mid = (ms[36] + ms[144]) / 2 if {36, 144} <= set(ms) else (ms[budgets[0]] + ms[budgets[-1]]) / 2
    loose = 1.5 * ms[budgets[-1]]
    print(f"{tight:.1f} {mid:.1f} {loose:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), *sys.argv[2:3]))
