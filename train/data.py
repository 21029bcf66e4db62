"""Datasets (LLaVA JSON / JSON Lines, the built-in benchmark) and the collator.

A dataset item is tokenised once with one `<image>` placeholder per image (`Example`; a
LLaVA record's "image" may be a list, the benchmark's clips carry two frames); the collator
expands each to T positions for every budget of the step. Images are loaded separately
(`dataset.images(i)`) so that a trainer with a frozen tower can reuse cached features.

Bad data is never used silently: a missing/corrupt image, a sample with no image, or a
sample whose answers were all truncated away is counted per reason and skipped with a
warning, or raises DataError with `strict=True` (`--strict-data`).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmvr.config import FMVRConfig
from fmvr.template import IMAGE_TOKEN, render
from fmvr.tokenizer import IGNORE_INDEX, encode_segments, expand_with_labels


class DataError(ValueError):
    """A sample that cannot be trained on (with --strict-data), or an unreadable data file."""


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # one placeholder per image, in the order of image_keys
    target: tuple[bool, ...]  # True on assistant tokens
    image_keys: tuple[str, ...]  # identify the images (path or scene seed) for feature caching
    index: int
    # Independent questions sharing the images: per token, 0 = the shared prefix (up to and
    # including the last image), k = the k-th question block, which sees the prefix and itself only.
    # None: one ordinary causal sequence.
    blocks: tuple[int, ...] | None = None


def read_records(path: str | Path) -> list[dict]:
    """A LLaVA JSON list (.json) or JSON Lines file (.jsonl): one record per conversation."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} not found; pass --data <llava.json|.jsonl> or --bench")
    text = p.read_text()
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not valid JSON ({e}); LLaVA data is a JSON list or JSON Lines") from e
    if not isinstance(records, list):
        raise DataError(f"{p} must hold a JSON list of records with 'image' and 'conversations'")
    return records


def tokenize(
    tok, cfg: FMVRConfig, template: str, conversations: list[dict], max_length: int, images: int = 1
):
    """ids + target mask (one placeholder per image), truncated so that the sequence expanded
    at the largest budget fits max_length; never cuts a placeholder. None if no target is left."""
    segments = render(template, conversations)
    ids, target = encode_segments(tok, segments, cfg.bos_id)
    n_img = sum(i == cfg.image_token_id for i in ids)
    if n_img != images:
        raise DataError(
            f"a sample with {images} image(s) needs {images} {IMAGE_TOKEN} placeholder(s), found {n_img}"
        )
    room = max_length - images * (max(cfg.budgets) - 1)  # unexpanded length allowed
    if _last_image(ids, cfg.image_token_id) >= room:
        raise DataError(
            f"max length {max_length} cannot hold {images} image(s) of {max(cfg.budgets)} tokens and the prompt"
        )
    ids, target = ids[:room], target[:room]
    if not any(target):
        return None
    return ids, target


def _last_image(ids: Sequence[int], image_token_id: int) -> int:
    return len(ids) - 1 - list(ids)[::-1].index(image_token_id)


def tokenize_blocks(
    tok,
    cfg: FMVRConfig,
    template: str,
    qas: Sequence[tuple[str, str]],
    max_length: int,
    images: int = 1,
) -> tuple[list[int], list[bool], list[int]]:
    """Independent single-question prompts about the same image(s), packed: the shared prefix
    (rendered up to the last placeholder) once, then each question + answer as its own block. Each block is
    exactly the inference prompt of that question (same tokens, same positions once the
    collator's block mask is applied), so nothing leaks between questions. Whole blocks past
    max_length (counted at the largest budget) are dropped."""
    from fmvr.template import user_turn

    prefix: list[int] | None = None
    ids: list[int] = []
    target: list[bool] = []
    blocks: list[int] = []
    room = max_length - images * (max(cfg.budgets) - 1)
    for k, (question, answer) in enumerate(qas, start=1):
        segs = render(template, [user_turn(question, images), {"from": "gpt", "value": answer}])
        q_ids, q_target = encode_segments(tok, segs, cfg.bos_id)
        cut = _last_image(q_ids, cfg.image_token_id) + 1
        if prefix is None:
            prefix = q_ids[:cut]
            ids, target, blocks = list(prefix), q_target[:cut], [0] * cut
        elif q_ids[:cut] != prefix:
            raise DataError(f"question {k} renders a different prefix before the image(s)")
        if len(ids) + len(q_ids) - cut > room:
            break
        ids += q_ids[cut:]
        target += q_target[cut:]
        blocks += [k] * (len(q_ids) - cut)
    return ids, target, blocks


class _Base:
    """Shared skip/strict bookkeeping."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: Counter[str] = Counter()

    def _skip(self, reason: str, what: str) -> None:
        if self.strict:
            raise DataError(f"{what}: {reason} (drop --strict-data to skip such samples)")
        self.skipped[reason] += 1
        warnings.warn(f"skipping {what}: {reason}", stacklevel=3)


class LlavaDataset(_Base):
    """LLaVA-format records + an image folder, tokenised with `template`."""

    def __init__(
        self,
        records: Sequence[dict],
        image_folder: str | Path,
        tok,
        cfg: FMVRConfig,
        template: str,
        max_length: int = 2048,
        strict: bool = False,
    ) -> None:
        from fmvr.preprocess import Preprocessor

        super().__init__(strict)
        self.records, self.folder, self.tok, self.cfg = list(records), Path(image_folder), tok, cfg
        self.template, self.max_length = template, max_length
        self.pre = Preprocessor.from_config(cfg)

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int) -> Example | None:
        rec = self.records[i]
        what = f"record {i} (id {rec.get('id', '?')})"
        image = rec.get("image")
        if not image or not (isinstance(image, str) or all(isinstance(n, str) and n for n in image)):
            self._skip(
                "no image (text-only samples are not supported; 'image' is a path or a list of paths)", what
            )
            return None
        names = self._names(i)
        try:
            out = tokenize(
                self.tok, self.cfg, self.template, rec["conversations"], self.max_length, len(names)
            )
        except (DataError, KeyError, ValueError) as e:
            self._skip(f"bad conversation: {e}", what)
            return None
        if out is None:
            self._skip("no answer tokens left after truncation to max length", what)
            return None
        return Example(tuple(out[0]), tuple(out[1]), tuple(str(self.folder / n) for n in names), i)

    def _names(self, i: int) -> list[str]:
        image = self.records[i]["image"]
        return [image] if isinstance(image, str) else list(image)

    def images(self, i: int) -> list[np.ndarray] | None:
        """float32 [3, S, S] per image, or None (counted) when one is missing or corrupt."""
        from fmvr.preprocess import ImageError

        out = []
        for name in self._names(i):
            path = self.folder / name
            if not path.is_file():
                self._skip("missing image", str(path))
                return None
            try:
                out.append(self.pre(str(path))[0])  # [3, S, S]
            except ImageError as e:
                self._skip(f"corrupt image ({e})", str(path))
                return None
        return out


def question_subset(qs: Sequence[tuple[str, str, str]], n: int) -> list[tuple[str, str, str]]:
    """The first `n` of a scene's (category, question, answer) list (already shuffled from the
    scene's seed), taking one of each category before a second of any; n <= 0: all of them."""
    if n <= 0 or n >= len(qs):
        return list(qs)
    firsts, rest, seen = [], [], set()
    for q in qs:
        (rest if q[0] in seen else firsts).append(q)
        seen.add(q[0])
    return (firsts + rest)[:n]


class BenchDataset(_Base):
    """The built-in benchmark generated on the fly: kind "qa" (stage 2: every question a scene
    supports, as independent blocks sharing the image, or with independent=False one multi-turn
    conversation, where later answers can be read off earlier ones), "caption" (stage 1), or "mix"
    (the qa blocks plus one "Describe the image." block answered by the caption). With clips > 0,
    items n.. n+clips-1 are two-frame clips (the "frames" questions as blocks about both frames;
    qa and mix only)."""

    def __init__(
        self,
        split: str,
        n: int,
        tok,
        cfg: FMVRConfig,
        template: str,
        kind: str = "qa",
        seed: int = 0,
        max_length: int = 2048,
        independent: bool = True,
        clips: int = 0,
        variant: str = "easy",
        questions: int = 0,
    ) -> None:
        from fmvr import tasks
        from fmvr.preprocess import Preprocessor

        super().__init__(strict=True)
        if kind not in ("qa", "caption", "mix"):
            raise ValueError(f"unknown bench kind {kind!r}; choose qa, caption or mix")
        if kind == "mix" and not independent:
            raise ValueError("bench kind 'mix' is built from independent question blocks")
        if clips and (kind == "caption" or not independent):
            raise ValueError(
                "two-frame clips are question blocks: use them with kind qa or mix (independent)"
            )
        if clips and variant != "easy":
            raise ValueError(
                "two-frame clips are built on easy-variant scenes: drop --bench-clips or use --bench-variant easy"
            )
        self.scenes = list(tasks.scenes(split, n, seed, variant))
        self.clips = list(tasks.clips(split, clips, seed))
        record_kind = "qa" if kind == "mix" else kind
        self.records = [tasks.llava_records(s, f"scene-{s.seed}", record_kind)[0] for s in self.scenes]
        self.tok, self.cfg, self.template, self.max_length = tok, cfg, template, max_length
        self.kind, self.questions = kind, questions
        self.independent = independent and kind in ("qa", "mix")
        self.pre = Preprocessor.from_config(cfg)

    def __len__(self) -> int:
        return len(self.scenes) + len(self.clips)

    def example(self, i: int) -> Example | None:
        if i >= len(self.scenes):
            from fmvr.tasks import clip_training_questions

            clip = self.clips[i - len(self.scenes)]
            qas = [(q, a) for _, q, a in clip_training_questions(clip)]
            ids, target, blocks = tokenize_blocks(self.tok, self.cfg, self.template, qas, self.max_length, 2)
            keys = (f"bench-{clip.seed}", f"bench-{clip.seed}-2")  # frame 1 is scene clip.seed itself
            return Example(tuple(ids), tuple(target), keys, i, tuple(blocks))
        if self.independent:
            from fmvr.tasks import DESCRIBE, caption, training_questions

            qas = [(q, a) for _, q, a in question_subset(training_questions(self.scenes[i]), self.questions)]
            if self.kind == "mix":  # the caption first: it is never dropped by max_length
                qas.insert(0, (DESCRIBE, caption(self.scenes[i])))
            ids, target, blocks = tokenize_blocks(self.tok, self.cfg, self.template, qas, self.max_length)
            return Example(tuple(ids), tuple(target), (f"bench-{self.scenes[i].seed}",), i, tuple(blocks))
        out = tokenize(self.tok, self.cfg, self.template, self.records[i]["conversations"], self.max_length)
        if out is None:
            raise DataError(f"bench sample {i} does not fit max length {self.max_length}")
        return Example(tuple(out[0]), tuple(out[1]), (f"bench-{self.scenes[i].seed}",), i)

    def images(self, i: int) -> list[np.ndarray]:
        """float32 [3, S, S] per image: the scene, or a clip's two frames."""
        from fmvr.tasks import render_scene

        frames = self.clips[i - len(self.scenes)].frames if i >= len(self.scenes) else (self.scenes[i],)
        return list(self.pre([render_scene(f) for f in frames]))  # each [3, S, S]


@dataclass
class Batch:
    """A collated micro-batch: the images (pixels or cached tower features) and, per budget,
    right-padded ids / attention mask / labels with T placeholders per image."""

    keys: list[str]  # every image of the batch, row by row (a row's images in prompt order)
    indices: list[int]
    pixel_values: torch.Tensor | None  # [P, 3, S, S] for the images named in pixel_keys (P <= len(keys))
    per_budget: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # T -> ([B,S_T] ids, mask, labels)
    pixel_keys: list[str] | None = None  # None: pixel_values has every image of keys, in order

    def num_targets(self) -> int:
        """Target tokens that contribute to the loss (after the shift), same for every budget."""
        labels = next(iter(self.per_budget.values()))[2]
        return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate(
    examples: Sequence[Example],
    pixels: Sequence[np.ndarray] | None,
    cfg: FMVRConfig,
    budgets: Sequence[int],
    pixel_keys: list[str] | None = None,
) -> Batch:
    """Pad and expand: per budget T, ids [B, S_T] (pad id), mask, labels [B, S_T].

    The mask is [B, S_T] (1 = token) for ordinary examples; when any example has question
    blocks it is a boolean [B, 1, S_T, S_T] (query, key) mask: causal, and a block's tokens
    see the shared prefix and their own block only. Positions follow from it (lm_loss_sum).
    """
    per_budget = {}
    packed = any(e.blocks is not None for e in examples)
    for t in budgets:
        rows = [expand_with_labels(e.ids, e.target, cfg.image_token_id, t) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)  # [B, S_T]
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [B, S_T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S_T]
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            labels[r, : len(row_labels)] = torch.tensor(row_labels)
            mask[r, : len(row_ids)] = 1
        if packed:
            mask = block_mask(examples, cfg.image_token_id, t, width)  # [B, 1, S_T, S_T]
        per_budget[t] = (ids, mask, labels)
    pix = torch.from_numpy(np.stack(pixels)) if pixels else None  # [P, 3, S, S]
    keys = [k for e in examples for k in e.image_keys]
    return Batch(keys, [e.index for e in examples], pix, per_budget, pixel_keys)


def block_mask(examples: Sequence[Example], image_token_id: int, tokens: int, width: int) -> torch.Tensor:
    """[B, 1, S, S] boolean attention mask (True = may attend) for block-packed examples."""
    out = torch.zeros((len(examples), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # [S, S]
    for r, e in enumerate(examples):
        seg: list[int] = []
        for i, b in zip(e.ids, e.blocks or [0] * len(e.ids), strict=True):
            seg += [b] * (tokens if i == image_token_id else 1)
        n = len(seg)
        s = torch.tensor(seg)  # [n]
        same = (s[None, :] == 0) | (s[None, :] == s[:, None])  # key in the prefix, or in the query's block
        out[r, 0, :n, :n] = causal[:n, :n] & same
        out[r, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding attends to itself (no NaN)
    return out
