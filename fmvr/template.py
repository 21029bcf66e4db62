"""Conversation templates of LLaVA-1.5 (Vicuna v1 and "plain"), torch-free.

A conversation is LLaVA's list of turns: [{"from": "human"|"gpt", "value": str}, ...].
`render` turns it into segments (text, is_target): training puts labels on target segments
only (assistant answers); inference renders the prompt with `add_generation_prompt=True`
and the model continues after it.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<image>"
EOS_TEXT = "</s>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("vicuna_v1", "plain")

Segment = tuple[str, bool]
Turn = dict[str, str]


def render(template: str, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
    """Segments (text, is_target) of a conversation in `template`."""
    _check_turns(turns)
    if template == "vicuna_v1":
        return _vicuna(turns, add_generation_prompt)
    if template == "plain":
        return _plain(turns, add_generation_prompt)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")


def prompt_text(template: str, question: str) -> str:
    """The inference prompt for one question about one image, as one string."""
    return "".join(text for text, _ in render(template, [user_turn(question)], add_generation_prompt=True))


def user_turn(question: str) -> Turn:
    """A human turn that carries the image, laid out as LLaVA's preprocess_multimodal does:
    any `<image>` is removed from the text and one `<image>\\n` is put in front."""
    text = question.replace(IMAGE_TOKEN, "").strip()
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{text}"}


def _vicuna(turns: Sequence[Turn], add_generation_prompt: bool) -> list[Segment]:
    # LLaVA-1.5 conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"
    segs: list[Segment] = [(VICUNA_SYSTEM + " ", False)]
    for turn in turns:
        if turn["from"] == "human":
            segs.append((f"USER: {turn['value']} ", False))
        else:
            segs.append(("ASSISTANT:", False))
            segs.append((f" {turn['value']}{EOS_TEXT}", True))
    if add_generation_prompt:
        segs.append(("ASSISTANT:", False))
    return segs


def _plain(turns: Sequence[Turn], add_generation_prompt: bool) -> list[Segment]:
    # LLaVA pretraining: the human text is replaced by the image alone, then the caption.
    segs: list[Segment] = []
    for turn in turns:
        if turn["from"] == "human":
            segs.append((IMAGE_TOKEN, False))
        else:
            segs.append((f"{turn['value']}\n", True))
    return segs


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        role = turn.get("from")
        if role not in ("human", "gpt"):
            raise ValueError(f"turn {i}: 'from' must be 'human' or 'gpt', got {role!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i}: 'value' must be a string")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {i}: expected a {expected!r} turn (turns alternate, human first)")
