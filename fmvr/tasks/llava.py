"""The benchmark in LLaVA format: records per scene, and a folder of PNGs + JSON."""

from __future__ import annotations

from pathlib import Path

from fmvr import atomic
from fmvr.tasks.render import render_scene
from fmvr.tasks.scene import DESCRIBE, Scene
from fmvr.tasks.variants import caption, scenes, training_questions


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
