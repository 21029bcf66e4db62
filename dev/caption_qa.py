"""Can the LM answer the benchmark's questions when the image is replaced by perfect text?

    python dev/caption_qa.py --preset small            # ~15 min on 2 cores

The language-model half of the question "where is the gap?" (dev/tower_probe.py asks the
tower half). Each test question is asked with the scene's caption in place of the image
("The image shows a red triangle at the top left, ... and a card with the digit 3."), first with
the LM as it ships (zero-shot), then after a few LoRA steps on the train split's questions asked
the same way (every question of a scene as an independent block, as stage 2 packs them). If the LM
learns the questions from text in a few steps while the image model stays at the answer priors,
the gap is in how the projector's visual tokens present the image, not in the LM or the tower.

Two presentations (`--presentations`):
    caption  the caption sentence in place of the image
    grid     an oracle 6x6 grid of visual tokens in place of the 36-token image: each cell is the sum of
             the word embeddings of what covers the cell's centre (" red" + " triangle", " card" + " 3",
             else " empty"), i.e. what a perfect projector could hand the LM at 36 tokens. It separates
             "can the LM read a grid of word-like tokens" from "does the projector make such tokens".

Scoring: the category's answer words are ranked by the LM's next-token logit after the chat
prompt (first token of "word" or "Word"), so a zero-shot LM that would open with "The answer
is" is still scored on what it ranks first. Writes <out>/caption_qa_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmvr import (
    atomic,  # noqa: E402
    tasks,  # noqa: E402
)
from fmvr.config import preset  # noqa: E402
from fmvr.model import build_model  # noqa: E402
from fmvr.template import render, user_turn  # noqa: E402
from fmvr.tokenizer import encode_segments, expand_image_tokens, preset_tokenizer  # noqa: E402
from train.data import Example, collate, tokenize_blocks  # noqa: E402
from train.ground import word_grid  # noqa: E402
from train.loss import lm_loss_sum  # noqa: E402
from train.stages import TrainConfig  # noqa: E402

PRESENTATIONS = ("caption", "grid")
CANDIDATES = {
    "colour": list(tasks.COLOURS),
    "count": list(tasks.NUMBERS[:5]),
    "region": [*tasks.SHAPES, "none"],
    "exist": ["yes", "no"],
    "digit": [str(d) for d in range(10)],
}


def caption_prefix(scene: tasks.Scene) -> str:
    return f"The image shows {tasks.caption(scene)}"


GRID = 6  # the oracle grid's side (36 tokens)


def oracle_grid(
    embeddings: torch.Tensor,
    tok,
    scene: tasks.Scene,
    side: int = GRID,
    layout: str = "sum",
    position: bool = False,
) -> torch.Tensor:
    """[side*side, D] row-major, from the scene record (fmvr.tasks.cell_words): per cell the word
    embeddings of the object (colour, shape) or card (" card", digit) whose box, grown by 8 px, holds the
    cell's centre, " empty" elsewhere. layout "sum": the words summed in every cell (train.ground.word_grid,
    the grounding stage's target); "checker": one word per cell, the first on even columns and the second
    on odd ones. `position` adds the words naming the layout cell ("top", "left")."""
    words = tasks.cell_words(scene, side, position)
    if layout == "sum":
        return word_grid(embeddings, tok, words)
    pick = [(w[k % side % 2 if len(w) > 1 else 0],) for k, w in enumerate(words)]
    return word_grid(embeddings, tok, pick)


def example(tok, cfg, scene: tasks.Scene, index: int, presentation: str) -> Example:
    """Every training question of `scene` as independent blocks (train.data.tokenize_blocks) after the
    image placeholder ("grid": filled with the oracle grid) or the caption's ids in its place."""
    qas = [(q, a) for _, q, a in tasks.training_questions(scene)]
    ids, target, blocks = tokenize_blocks(tok, cfg, cfg.template, qas, 4096)
    if presentation == "grid":
        return Example(tuple(ids), tuple(target), (), index, tuple(blocks))
    at = ids.index(cfg.image_token_id)
    words = tok.encode(caption_prefix(scene), add_special_tokens=False).ids
    return Example(
        tuple(ids[:at] + words + ids[at + 1 :]),
        tuple(target[:at] + [False] * len(words) + target[at + 1 :]),
        (),
        index,
        tuple(blocks[:at] + [0] * len(words) + blocks[at + 1 :]),
    )


def prompt_ids(tok, cfg, scene: tasks.Scene, question: str, presentation: str) -> list[int]:
    text = question if presentation == "grid" else f"{caption_prefix(scene)}\n{question}"
    turns = [user_turn(text)] if presentation == "grid" else [{"from": "human", "value": text}]
    ids, _ = encode_segments(tok, render(cfg.template, turns, add_generation_prompt=True), cfg.bos_id)
    return expand_image_tokens(ids, cfg.image_token_id, GRID * GRID) if presentation == "grid" else ids


def features(model, tok, scenes: list[tasks.Scene], presentation: str) -> torch.Tensor | None:
    """[B, GRID*GRID, D] oracle grids for "grid", None for "caption" (no image placeholder)."""
    if presentation != "grid":
        return None
    table = model.language_model.get_input_embeddings().weight
    return torch.stack([oracle_grid(table, tok, s) for s in scenes])


@torch.no_grad()
def evaluate(model, tok, cfg, scenes: list[tasks.Scene], presentation: str) -> dict[str, tuple[float, int]]:
    """{category: (accuracy, n)}: the top-ranked answer word per test question."""
    first = {
        c: [
            [tok.encode(w, add_special_tokens=False).ids[0] for w in words],
            [tok.encode(w.capitalize(), add_special_tokens=False).ids[0] for w in words],
        ]
        for c, words in CANDIDATES.items()
    }
    hits = {c: [0, 0] for c in CANDIDATES}
    was_training = model.training
    model.eval()
    for scene in scenes:
        feats = features(model, tok, [scene], presentation)  # [1, 36, D] or None
        for c, q, a in scene.questions:
            ids = torch.tensor([prompt_ids(tok, cfg, scene, q, presentation)])  # [1, S]
            logits = model.language_model(inputs_embeds=model.embed(ids, feats)).logits[0, -1].float()  # [V]
            score = torch.maximum(logits[first[c][0]], logits[first[c][1]])  # [candidates]
            hits[c][0] += CANDIDATES[c][int(score.argmax())] == a
            hits[c][1] += 1
    model.train(was_training)
    return {c: (h / n, n) for c, (h, n) in hits.items()}


def train_lora(model, tok, cfg, scenes, presentation: str, args, log) -> None:
    """LoRA (r 64, alpha 128, as the small recipes) on the train questions in `presentation`."""
    from train.loop import add_lora

    add_lora(model, TrainConfig(stage="stage2", lora=True, lora_alpha=128))
    params = [p for p in model.language_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.steps):
        picked = [scenes[i] for i in rng.sample(range(len(scenes)), args.batch_size)]
        exs = [example(tok, cfg, s, i, presentation) for i, s in enumerate(picked)]
        b = collate(exs, None, cfg, (GRID * GRID,))
        ids, mask, labels = b.per_budget[GRID * GRID]  # "caption": no placeholder, nothing expands
        feats = features(model, tok, picked, presentation)
        loss = lm_loss_sum(model, ids, mask, labels, feats) / b.num_targets()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log(f"{presentation} step {step + 1}/{args.steps} loss {float(loss.detach()):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python dev/caption_qa.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset (its LM and chat template)")
    p.add_argument("--train-n", type=int, default=400, help="train-split scenes the LoRA steps draw from")
    p.add_argument("--test-n", type=int, default=40, help="test-split scenes asked (5 questions each)")
    p.add_argument("--steps", type=int, default=30, help="LoRA steps per presentation (a fresh LM each)")
    p.add_argument("--batch-size", type=int, default=8, help="scenes per step")
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (r 64, alpha 128)")
    p.add_argument("--seed", type=int, default=0, help="scene order of the LoRA steps")
    p.add_argument(
        "--presentations", default="caption,grid", help=f"comma-separated, from {', '.join(PRESENTATIONS)}"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="dev/results", help="folder for caption_qa_<preset>.{json,md}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    tok = preset_tokenizer(cfg)
    train_scenes = list(tasks.scenes("train", args.train_n))
    test_scenes = list(tasks.scenes("test", args.test_n))
    t0 = time.time()
    rows = []
    for presentation in args.presentations.split(","):
        if presentation not in PRESENTATIONS:
            p.error(f"--presentations: {presentation!r} is not one of {', '.join(PRESENTATIONS)}")
        model = build_model(cfg, seed=args.seed)  # a fresh LM per presentation
        rows.append(_rows(presentation, "zero-shot", 0, evaluate(model, tok, cfg, test_scenes, presentation)))
        print(f"{presentation} zero-shot: {_line(rows[-1])}", flush=True)
        if args.steps:
            train_lora(model, tok, cfg, train_scenes, presentation, args, print)
            res = evaluate(model, tok, cfg, test_scenes, presentation)
            rows.append(_rows(presentation, "lora", args.steps, res))
            print(f"{presentation} after {args.steps} LoRA steps: {_line(rows[-1])}", flush=True)
    flat = [r for group in rows for r in group]
    baseline = tasks.constant_baseline("test", args.test_n)
    report = {
        "preset": args.preset,
        "command": "python dev/caption_qa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_n": args.train_n,
        "test_n": args.test_n,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seconds": round(time.time() - t0, 1),
        "rows": flat,
        "constant_baseline": {c: acc for c, (_, acc) in baseline.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / f"caption_qa_{args.preset}.json", report, indent=1)
    atomic.write_text(out / f"caption_qa_{args.preset}.md", _markdown(report))
    print(f"wrote {out}/caption_qa_{args.preset}.{{json,md}}")
    return 0


def _rows(presentation: str, phase: str, steps: int, res: dict[str, tuple[float, int]]) -> list[dict]:
    return [
        {"presentation": presentation, "phase": phase, "steps": steps, "category": c, "accuracy": acc, "n": n}
        for c, (acc, n) in res.items()
    ]


def _line(rows: list[dict]) -> str:
    return ", ".join(f"{r['category']} {100 * r['accuracy']:.1f}" for r in rows)


def _markdown(report: dict) -> str:
    cats = list(CANDIDATES)
    lines = [
        f"# The LM on perfect text instead of the image (`{report['preset']}`)",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s). Accuracy (%) on {report['test_n']} test scenes "
        "(5 questions each) with the image replaced by its caption sentence (caption) or by an oracle 6x6 grid of "
        "word embeddings, one cell per token (grid); top-ranked answer word.",
        "",
        "| presentation | LM | " + " | ".join(cats) + " |",
        "|---|---|" + "---|" * len(cats),
    ]
    for key in dict.fromkeys((r["presentation"], r["phase"]) for r in report["rows"]):
        rs = {r["category"]: r for r in report["rows"] if (r["presentation"], r["phase"]) == key}
        steps = rs[cats[0]]["steps"]
        name = (
            "as shipped" if key[1] == "zero-shot" else f"after {steps} LoRA steps of {report['batch_size']}"
        )
        lines.append(
            f"| {key[0]} | {name} | " + " | ".join(f"{100 * rs[c]['accuracy']:.1f}" for c in cats) + " |"
        )
    base = report["constant_baseline"]
    lines.append("| - | best constant answer | " + " | ".join(f"{100 * base[c]:.1f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
