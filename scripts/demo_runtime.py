"""Step 4 of `make demo`: a held-out benchmark scene, a question, and three deadlines.

Prints "TIGHT MID LOOSE" (ms) for `python -m runtime ask --latency-ms`, chosen from this
device's own predictions so the demo shows three different choices on any machine:
below the cheapest budget, between the 36- and 144-token budgets, and room for 576.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from runtime.pipeline import Pipeline
from train.bench import make_questions, render_scene, scenes


def main(out: Path) -> int:
    scene = next(scenes("test", 1))
    image = out / "scene.png"
    render_scene(scene).save(image)
    _, question, answer = next(q for q in make_questions(scene, random.Random(0)) if q[0] == "colour")
    (out / "question.txt").write_text(question)
    print(f"image {image}: {question!r} (true answer: {answer})", file=sys.stderr)

    pipe = Pipeline.load(out / "bundle")
    for _ in range(2):  # the first request warms the sessions; use the second's predictions
        ms = pipe.ask(image, question, latency_ms=1e9, max_new_tokens=1).candidates_ms
    budgets = sorted(ms)
    tight = 0.5 * ms[budgets[0]]
    mid = (ms[36] + ms[144]) / 2 if {36, 144} <= set(ms) else (ms[budgets[0]] + ms[budgets[-1]]) / 2
    loose = 1.5 * ms[budgets[-1]]
    print(f"{tight:.1f} {mid:.1f} {loose:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
