"""Step 4 of `make demo`: two held-out benchmark scenes, one question each, three deadlines.

The two scenes share a shape in different colours and both get "What colour is the <shape>?",
so the answers can only come from the image. Writes <out>/scene{0,1}.png and
question{0,1}.txt, and the two frames of a held-out clip (<out>/frame{1,2}.png, frames_question.txt:
which object appeared in the second frame); prints "TIGHT MID LOOSE" (ms) for `python -m runtime ask --latency-ms`,
chosen from this device's own predictions so the demo shows three different choices on any
machine: below the cheapest budget, between the 36- and 144-token budgets, and room for 576.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from fmvr.atomic import open_atomic, write_text
from fmvr.tasks import APPEARED, clips, render_scene, scenes
from runtime.pipeline import Pipeline


def two_scenes():
    """The first two test scenes with a shape in common, coloured differently."""
    pool = list(scenes("test", 12))
    for a, b in itertools.combinations(pool, 2):
        colours = {o.shape: o.colour for o in a.objects}
        for o in b.objects:
            if o.shape in colours and colours[o.shape] != o.colour:
                return (a, colours[o.shape]), (b, o.colour), o.shape
    raise RuntimeError("no two test scenes share a shape in different colours")


def main(out: Path) -> int:
    *pair, shape = two_scenes()
    question = f"What colour is the {shape}?"
    for k, (scene, colour) in enumerate(pair):
        image = out / f"scene{k}.png"
        with open_atomic(image, "wb") as f:
            render_scene(scene).save(f, format="PNG")
        write_text(out / f"question{k}.txt", question)
        print(f"image {image}: {question!r} (true answer: {colour})", file=sys.stderr)
    clip = next(clips("test", 1))
    for k, frame in enumerate(clip.frames, start=1):
        with open_atomic(out / f"frame{k}.png", "wb") as f:
            render_scene(frame).save(f, format="PNG")
    write_text(out / "frames_question.txt", APPEARED)
    print(
        f"frames {out}/frame1.png, frame2.png: {APPEARED!r} (true answer: {clip.added.shape})",
        file=sys.stderr,
    )

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
    raise SystemExit(main(Path(sys.argv[1])))
