"""Evaluation: accuracy per budget and category on the built-in benchmark, and an answers
file (JSON Lines, LLaVA model_vqa style) for any LLaVA-format question file. Greedy.

    python -m train.eval --checkpoint runs/tiny/final --bench-n 100
    python -m train.eval --checkpoint DIR --questions q.jsonl --image-folder imgs --answers-file a.jsonl --tokens 36

Generation is batched: prompts left-padded with explicit position ids, the image encoded
once for every budget, greedy decoding until every row has emitted </s>.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fmvr import atomic
from fmvr.cli import parse_tokens
from fmvr.model import decode
from fmvr.tokenizer import expand_image_tokens, prompt_ids


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[list[int]],
    feats: torch.Tensor,
    tokens: int,
    max_new_tokens: int = 8,
    images: int = 1,
) -> list[list[int]]:
    """Greedy answers for prompts (`images` placeholders each) with visual tokens feats
    [B * images, T, D] (row by row)."""
    cfg = model.cfg
    rows = [expand_image_tokens(p, cfg.image_token_id, tokens, images) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)  # [B, S] left-padded
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return model.generate(None, ids, tokens, max_new_tokens, attention_mask=mask, image_features=feats)


def split_at_image(ids: Sequence[int], image_token_id: int) -> tuple[list[int], list[int]]:
    """(prefix up to and including the one placeholder, the rest). The placeholder is a special
    token, so the tokenizer never merges across it: prefix + rest tokenises as the whole."""
    k = list(ids).index(image_token_id)
    return list(ids[: k + 1]), list(ids[k + 1 :])


@torch.no_grad()
def generate_shared(
    model,
    prefix: list[int],
    feats: torch.Tensor,
    suffixes: Sequence[list[int]],
    per_image: int,
    tokens: int,
    max_new_tokens: int = 8,
) -> list[list[int]]:
    """Greedy answers for several questions per image, the image's prefix computed once.

    prefix: ids up to the placeholder (the same for every row); feats [b, T, D]; suffixes:
    b * per_image question ids (image-major). The prefix (system prompt + T visual tokens) is
    prefilled once per image and its KV cache repeated per question; each question follows
    with padding between (masked, positions counted over real tokens only), so the answers
    equal `generate_batch` on the full prompts at a fraction of the prefill.
    """
    cfg, lm = model.cfg, model.language_model
    b = feats.shape[0]
    if len(suffixes) != b * per_image:
        raise ValueError(f"{len(suffixes)} questions for {b} images x {per_image}")
    head = torch.tensor([expand_image_tokens(prefix, cfg.image_token_id, tokens)] * b)  # [b, P]
    out = lm(inputs_embeds=model.embed(head, feats), use_cache=True)
    past = out.past_key_values
    past.batch_repeat_interleave(per_image)  # [b * q, kv, P, hd]
    width = max(map(len, suffixes))
    ids = torch.full((len(suffixes), width), cfg.pad_token_id, dtype=torch.long)  # [b*q, L]
    mask = torch.ones((len(suffixes), head.shape[1] + width), dtype=torch.long)  # [b*q, P+L]
    for r, row in enumerate(suffixes):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, head.shape[1] : head.shape[1] + width - len(row)] = 0  # padding between prefix and question
    embeds = lm.get_input_embeddings()(ids)  # [b*q, L, D]
    return decode(lm, embeds, mask, past, max_new_tokens, cfg.eos_token_id)


@torch.no_grad()
def evaluate_bench(
    model,
    tok,
    budgets: Sequence[int],
    n: int = 100,
    split: str = "test",
    seed: int = 0,
    batch_scenes: int = 8,
    progress: bool = False,
    clips: int = 0,
    variant: str = "easy",
) -> dict:
    """{"accuracy": {T: {category: acc, "all": acc}}, "n_questions": ..., "samples": [...]}.
    With clips > 0, also the "frames" category on that many two-frame clips (not in "all")."""
    from fmvr import tasks
    from fmvr.preprocess import Preprocessor

    model.eval()
    pre = Preprocessor.from_config(model.cfg)
    cats = tasks.categories(variant)
    if clips and variant != "easy":
        raise ValueError("two-frame clips are easy-variant scenes: score them with --bench-variant easy")
    scenes = list(tasks.scenes(split, n, seed, variant))
    hits: dict[int, dict[str, list[bool]]] = {t: defaultdict(list) for t in budgets}
    samples = []
    for i in range(0, len(scenes), batch_scenes):
        chunk = scenes[i : i + batch_scenes]
        pix = torch.from_numpy(pre([tasks.render_scene(s) for s in chunk]))  # [b, 3, S, S]
        visual = model.encode_budgets(pix, tuple(budgets))  # {T: [b, T, D]}
        qs = [(j, c, q, a) for j, s in enumerate(chunk) for c, q, a in s.questions]  # image-major
        parts = [
            split_at_image(
                prompt_ids(tok, model.cfg.template, q, 1, model.cfg.bos_id), model.cfg.image_token_id
            )
            for _, _, q, _ in qs
        ]
        prefix = parts[0][0]
        if any(p != prefix for p, _ in parts):
            raise ValueError("benchmark prompts differ before the image placeholder")
        per_image = len(qs) // len(chunk)
        for t in budgets:
            answers = generate_shared(model, prefix, visual[t], [r for _, r in parts], per_image, t)
            for (j, c, q, a), ids in zip(qs, answers):
                _score(hits, samples, chunk[j].seed, t, c, q, a, tok.decode(ids).strip())
        if progress:
            print(
                f"  eval {min(i + batch_scenes, len(scenes))}/{len(scenes)} scenes",
                file=sys.stderr,
                flush=True,
            )
    if clips:
        _evaluate_clips(
            model, tok, pre, budgets, list(tasks.clips(split, clips, seed)), batch_scenes, hits, samples
        )
    acc = {}
    for t in budgets:
        acc[t] = {c: float(np.mean(hits[t][c])) for c in cats}
        acc[t]["all"] = float(np.mean([h for c in cats for h in hits[t][c]]))
        if clips:
            acc[t][tasks.CLIP_CATEGORY] = float(np.mean(hits[t][tasks.CLIP_CATEGORY]))
    return {
        "accuracy": acc,
        "n_scenes": len(scenes),
        "n_clips": clips,
        "n_questions": len(scenes) * len(cats) + clips,
        "split": split,
        "variant": variant,
        "bench_seed": seed,
        "samples": samples,
    }


def _evaluate_clips(model, tok, pre, budgets, clips, batch: int, hits, samples) -> None:
    """The "frames" questions: both frames in one prompt, the vision pass batched over them."""
    from fmvr import tasks

    for i in range(0, len(clips), batch):
        chunk = clips[i : i + batch]
        frames = [tasks.render_scene(f) for c in chunk for f in c.frames]
        visual = model.encode_budgets(torch.from_numpy(pre(frames)), tuple(budgets))  # {T: [2b, T, D]}
        qs = [(c, q, a) for clip in chunk for c, q, a in clip.questions]
        if len(qs) != len(chunk):
            raise ValueError("a clip is scored on one question")
        prompts = [prompt_ids(tok, model.cfg.template, q, 2, model.cfg.bos_id) for _, q, _ in qs]
        for t in budgets:
            answers = generate_batch(model, prompts, visual[t], t, images=2)
            for clip, (c, q, a), ids in zip(chunk, qs, answers):
                _score(hits, samples, clip.seed, t, c, q, a, tok.decode(ids).strip())


def _score(
    hits, samples: list, scene: int, t: int, category: str, question: str, answer: str, text: str
) -> None:
    """Score one generated answer and keep it as a sample."""
    from fmvr.tasks import score

    hits[t][category].append(score(text, answer))
    samples.append(
        {
            "scene": scene,
            "budget": t,
            "category": category,
            "question": question,
            "answer": answer,
            "output": text,
        }
    )


def format_table(acc: dict) -> str:
    from fmvr.tasks import CLIP_CATEGORY

    first = next(iter(acc.values()))
    cols = [c for c in first if c not in ("all", CLIP_CATEGORY)] + ["all"]
    cols += [CLIP_CATEGORY] if CLIP_CATEGORY in first else []
    lines = ["| tokens | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for t, row in acc.items():
        lines.append(f"| {t} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def answer_file(model, tok, questions: str, image_folder: str, out: str, tokens: int, model_id: str) -> int:
    """LLaVA model_vqa-style answers for a question file (JSON Lines with "text"/"image", or LLaVA JSON)."""
    from fmvr.preprocess import Preprocessor
    from train.data import read_records

    pre = Preprocessor.from_config(model.cfg)
    records = read_records(questions)
    with atomic.open_atomic(out) as f:
        for k, rec in enumerate(records):
            question = rec["text"] if "text" in rec else rec["conversations"][0]["value"]
            pix = torch.from_numpy(pre(str(Path(image_folder) / rec["image"])))  # [1, 3, S, S]
            feats = model.encode_image(pix, tokens)  # [1, T, D]
            ids = generate_batch(
                model,
                [prompt_ids(tok, model.cfg.template, question, 1, model.cfg.bos_id)],
                feats,
                tokens,
                max_new_tokens=64,
            )[0]
            qid = rec.get("question_id", rec.get("id", k))
            row = {
                "question_id": qid,
                "prompt": question,
                "text": tok.decode(ids).strip(),
                "answer_id": f"{qid}-{tokens}",
                "model_id": model_id,
                "metadata": {"tokens": tokens},
            }
            f.write(json.dumps(row) + "\n")
    return len(records)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (config.json + model.safetensors + tokenizer.json)",
    )
    p.add_argument(
        "--tokens",
        default="all",
        help="budgets to score, comma-separated, or all (default); with --questions: one budget "
        "(default: the largest)",
    )
    p.add_argument(
        "--bench-n", type=int, default=100, help="built-in benchmark scenes to score (5 questions each)"
    )
    p.add_argument(
        "--bench-clips", type=int, default=0, help="two-frame clips to score as well (the frames category)"
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="benchmark split")
    p.add_argument("--bench-seed", type=int, default=0, help="benchmark seed")
    p.add_argument(
        "--bench-variant",
        default="easy",
        choices=("easy", "detail"),
        help="built-in benchmark variant: easy (3x3 layout) or detail (many small objects)",
    )
    p.add_argument("--out", default="", help="write the accuracy JSON (and per-question samples) here")
    p.add_argument(
        "--reuse", action="store_true", help="print the saved --out result if it is newer than the checkpoint"
    )
    p.add_argument(
        "--questions", default="", help="a LLaVA-format question file: answer it instead of the benchmark"
    )
    p.add_argument("--image-folder", default=".", help="folder the question file's images are relative to")
    p.add_argument("--answers-file", default="answers.jsonl", help="where to write the answers (JSON Lines)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from fmvr.checkpoint import load_checkpoint
    from fmvr.tokenizer import load_tokenizer

    args = parse_args(argv)
    if args.reuse and args.out and _fresh(Path(args.out), Path(args.checkpoint)):
        print(
            format_table({int(t): v for t, v in json.loads(Path(args.out).read_text())["accuracy"].items()})
        )
        print(f"(saved result {args.out}; drop --reuse to score again)")
        return 0
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint).eval()
    tok = load_tokenizer(args.checkpoint)
    try:
        budgets = parse_tokens(args.tokens, model.cfg.budgets)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.questions:
        if len(budgets) != 1 and args.tokens not in ("", "all"):
            print(
                "error: --questions answers at one budget: pass one --tokens value, e.g. --tokens 36",
                file=sys.stderr,
            )
            return 2
        tokens = budgets[0]  # the one asked for, or the largest
        n = answer_file(
            model,
            tok,
            args.questions,
            args.image_folder,
            args.answers_file,
            tokens,
            Path(args.checkpoint).name,
        )
        print(
            f"wrote {n} answers at {tokens} tokens to {args.answers_file}; score them with your benchmark's scorer"
        )
        return 0
    res = evaluate_bench(
        model,
        tok,
        budgets,
        args.bench_n,
        args.split,
        args.bench_seed,
        progress=True,
        clips=args.bench_clips,
        variant=args.bench_variant,
    )
    print(format_table(res["accuracy"]))
    if args.out:
        atomic.write_json(args.out, res, indent=1)
        print(f"wrote {args.out}")
    print(f"next: python -m export --checkpoint {args.checkpoint} --out bundle   (export the trained model)")
    return 0


def _fresh(result: Path, ckpt: Path) -> bool:
    weights = ckpt / "model.safetensors"
    return result.is_file() and weights.is_file() and result.stat().st_mtime > weights.stat().st_mtime


if __name__ == "__main__":
    raise SystemExit(main())
