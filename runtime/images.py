"""Several images per request: the image list, the prompt's placeholders, per-image budgets,
the context check, and the batched vision pass (runtime.pipeline uses these; torch-free).

    as_images(image)                  one image source or a list of them -> a list (newest last)
    per_image(tokens, n)              a forced budget (int: every image) or a list -> one per image
    forced_choice(policy, budgets, ...)
                                      the Choice of forced budgets, with the policy's prediction
    check_context(text, budgets, ...) ContextError naming the numbers when the prompt does not fit
    encode_images(vision, inputs, budgets)
                                      the vision pass: one backend call per group of images that share
                                      an input shape (and, per-budget graphs, a budget), batched
    merge_features(ids, feats, image_id)
                                      where each image's visual tokens go in the expanded prompt

Images are in prompt order: the i-th image fills the i-th `<image>` placeholder, and the last
one is "the newest" that the policy gives the largest budget (runtime.policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmvr.preprocess import SINGLE
from fmvr.tokenizer import expand_image_tokens
from runtime.options import AskOptions, OptionsError
from runtime.policy import Choice, Policy

MAX_IMAGES = 32  # per request: past this the vision pass alone would dwarf any latency budget


class ContextError(ValueError):
    """The prompt (text + every image's visual tokens) plus max_new_tokens exceeds the context."""

    def __init__(self, text_tokens: int, budgets: Sequence[int], max_new_tokens: int, context: int) -> None:
        self.text_tokens, self.budgets = text_tokens, tuple(budgets)
        self.max_new_tokens, self.context = max_new_tokens, context
        super().__init__(
            f"this request needs {self.need} tokens of context ({text_tokens} prompt tokens + "
            f"{visual_text(self.budgets)} + max_new_tokens {max_new_tokens}); the model's context is "
            f"{context} tokens: shorten the prompt, send fewer images, or lower max_new_tokens or tokens"
        )

    @property
    def need(self) -> int:
        return self.text_tokens + sum(self.budgets) + self.max_new_tokens


def visual_text(budgets: Sequence[int]) -> str:
    """'36 visual tokens' for one image; '216 visual tokens (3 images: 36 + 36 + 144)' for several."""
    if len(budgets) == 1:
        return f"{budgets[0]} visual tokens"
    return f"{sum(budgets)} visual tokens ({len(budgets)} images: {' + '.join(map(str, budgets))})"


def check_context(text_tokens: int, budgets: Sequence[int], max_new_tokens: int, context: int) -> None:
    if text_tokens + sum(budgets) + max_new_tokens > context:
        raise ContextError(text_tokens, budgets, max_new_tokens, context)


def as_images(image: Any) -> list[Any]:
    """One image source (path, bytes, PIL image, frame) -> [it]; a list or tuple of them, or a
    [N, H, W, C] uint8 array (N frames) -> a list. At least 1 and at most MAX_IMAGES."""
    if isinstance(image, np.ndarray) and image.ndim == 4:
        images = list(image)  # [H, W, C] each
    elif isinstance(image, SINGLE):
        images = [image]
    elif isinstance(image, (list, tuple)):
        images = list(image)
    else:
        raise TypeError(
            f"image must be a path, bytes, a PIL image, a frame (numpy array / fmvr.frames.Frame) "
            f"or a list of them, got {type(image).__name__}"
        )
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ValueError(f"a request takes 1 to {MAX_IMAGES} images, got {len(images)}")
    return images


def per_image(tokens: int | Sequence[int], n: int) -> tuple[int, ...]:
    """A forced budget for each of `n` images: an int applies to every image, a list gives one
    per image in order (OptionsError when its length is not n)."""
    if isinstance(tokens, int):
        return (tokens,) * n
    if len(tokens) != n:
        raise OptionsError(
            "tokens",
            f"lists {len(tokens)} budgets {list(tokens)} for {n} image(s): give one per image, "
            "or one number for all",
        )
    return tuple(tokens)


def forced_choice(
    policy: Policy | None,
    budgets: tuple[int, ...],
    opts: AskOptions,
    text_tokens: int,
    spent_ms: float | None,
    load: int,
) -> Choice:
    """The Choice for budgets the caller forced: predicted (with a profile) but not chosen."""
    pred = policy.predict(budgets, text_tokens, opts.max_new_tokens, spent_ms, load) if policy else None
    met = None if opts.latency_ms is None or pred is None else pred.time(opts.objective) <= opts.latency_ms
    return Choice(budgets[-1], pred, met, "budget forced by the caller", budgets=budgets)


# ---- the vision pass -----------------------------------------------------------------------------


def groups(inputs: Sequence[np.ndarray], budgets: Sequence[int], shared: bool) -> dict[tuple, list[int]]:
    """Image indices that one backend call can serve, keyed by input shape (a shared graph gives
    every budget in one pass) or by (budget, input shape) (per-budget graphs)."""
    out: dict[tuple, list[int]] = {}
    for i, (x, t) in enumerate(zip(inputs, budgets, strict=True)):
        key = tuple(x.shape[1:]) if shared else (t, *x.shape[1:])
        out.setdefault(key, []).append(i)
    return out


def encode_images(
    vision: Any, inputs: Sequence[np.ndarray], budgets: Sequence[int]
) -> tuple[list[np.ndarray], int]:
    """Visual tokens per image at its budget ([T_i, D] each, in order) and the number of backend
    calls: images that share an input shape go in one batch (frames of other sizes under in-graph
    preprocessing take a call of their own), split at the backend's max_batch (TensorRT profiles)."""
    feats: list[np.ndarray | None] = [None] * len(inputs)
    limit = getattr(vision, "max_batch", None) or len(inputs)
    calls = 0
    for idx in groups(inputs, budgets, vision.shared).values():
        for start in range(0, len(idx), limit):
            chunk = idx[start : start + limit]
            batch = np.concatenate([inputs[i] for i in chunk], axis=0)  # [b, 3, S, S] or [b, H, W, 3]
            out = vision.encode(batch, sorted({budgets[i] for i in chunk}))  # T -> [b, T, D]
            calls += 1
            for row, i in enumerate(chunk):
                feats[i] = out[budgets[i]][row]  # [T_i, D]
    return [f for f in feats if f is not None], calls


def merge_features(
    ids: Sequence[int], feats: Sequence[np.ndarray], image_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(expanded ids [S], visual tokens [sum T_i, D]) with image i's T_i tokens at the i-th
    placeholder: the rows of the second fill the positions where the first equals image_id."""
    lengths = [int(f.shape[0]) for f in feats]
    expanded = np.asarray(expand_image_tokens(ids, image_id, lengths), dtype=np.int64)  # [S]
    return expanded, np.concatenate(list(feats), axis=0)  # [sum T_i, D]
