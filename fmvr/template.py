"""Conversation templates, torch-free: LLaVA-1.5's Vicuna v1 and "plain", and ChatML
(SmolLM2's chat template, default system prompt included).

A conversation is LLaVA's list of turns: [{"from": "human"|"gpt", "value": str}, ...],
optionally opened by {"from": "system", "value": str} (replaces the template's system
prompt; "plain" has none and refuses one).
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
CHATML_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = ("vicuna_v1", "plain", "chatml")

Segment = tuple[str, bool]
Turn = dict[str, str]


def render(template: str, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Segment]:
    """Segments (text, is_target) of a conversation in `template`."""
    system, turns = _split_system(turns)
    if template == "vicuna_v1":
        return _vicuna(turns, add_generation_prompt, VICUNA_SYSTEM if system is None else system)
    if template == "chatml":
        return _chatml(turns, add_generation_prompt, CHATML_SYSTEM if system is None else system)
    if template == "plain":
        if system is not None:
            raise ValueError("the plain template has no system prompt: drop the system turn")
        return _plain(turns, add_generation_prompt)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")


def prompt_turns(prompt: str | Sequence[Turn], n: int) -> list[Turn]:
    """The conversation with exactly `n` image placeholders (n = 0: a text-only prompt): a
    question gets `<image>\\n` x n in front; turns keep the placeholders they hold when that is n, and get n in front of the first
    human turn when they hold none; any other count is a ValueError."""
    if isinstance(prompt, str):
        return [user_turn(prompt, n) if n else {"from": "human", "value": prompt}]
    turns = list(prompt)
    found = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in turns if t.get("from") == "human")
    if found == n:
        return turns
    if found:
        raise ValueError(
            f"the prompt holds {found} {IMAGE_TOKEN} placeholder(s) but {n} image(s) were given: put one "
            f"{IMAGE_TOKEN} per image where it belongs, or none (then all go before the first question)"
        )
    first = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    if first is None:
        raise ValueError("the conversation has no human turn to carry the image(s)")
    turns[first] = user_turn(turns[first]["value"], n)
    return turns


def prompt_text(template: str, prompt: str | Sequence[Turn], images: int = 1) -> str:
    """The inference prompt for a question (or LLaVA turns) about `images` images, as one string."""
    turns = prompt_turns(prompt, images)
    return "".join(text for text, _ in render(template, turns, add_generation_prompt=True))


def user_turn(question: str, images: int = 1) -> Turn:
    """A human turn that carries `images` images, laid out as LLaVA's preprocess_multimodal does:
    any `<image>` is removed from the text and one `<image>\\n` per image is put in front, in
    order (the LLaVA multi-image layout: `<image>\\n<image>\\nquestion`)."""
    if images < 1:
        raise ValueError(f"a turn that carries images needs at least one, got images={images}")
    text = question.replace(IMAGE_TOKEN, "").strip()
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n" * images + text}


def _split_system(turns: Sequence[Turn]) -> tuple[str | None, Sequence[Turn]]:
    """(system prompt or None, the alternating human/gpt turns), both checked."""
    system = None
    if turns and turns[0].get("from") == "system":
        if not isinstance(turns[0].get("value"), str):
            raise ValueError("turn 0: a system turn's 'value' must be a string")
        system, turns = turns[0]["value"], turns[1:]
    _check_turns(turns)
    return system, turns


def _vicuna(turns: Sequence[Turn], add_generation_prompt: bool, system: str) -> list[Segment]:
    # LLaVA-1.5 conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"
    segs: list[Segment] = [(system + " ", False)]
    for turn in turns:
        if turn["from"] == "human":
            segs.append((f"USER: {turn['value']} ", False))
        else:
            segs.append(("ASSISTANT:", False))
            segs.append((f" {turn['value']}{EOS_TEXT}", True))
    if add_generation_prompt:
        segs.append(("ASSISTANT:", False))
    return segs


def _chatml(turns: Sequence[Turn], add_generation_prompt: bool, system: str) -> list[Segment]:
    # "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    segs: list[Segment] = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for turn in turns:
        if turn["from"] == "human":
            segs.append((f"<|im_start|>user\n{turn['value']}<|im_end|>\n", False))
        else:
            segs.append(("<|im_start|>assistant\n", False))
            segs.append((f"{turn['value']}<|im_end|>", True))  # the answer and its end are learned
            segs.append(("\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def _plain(turns: Sequence[Turn], add_generation_prompt: bool) -> list[Segment]:
    # LLaVA pretraining: the human text is replaced by the image alone, then the caption.
    segs: list[Segment] = []
    for turn in turns:
        if turn["from"] == "human":  # one placeholder per image it carries (at least one)
            segs.append((IMAGE_TOKEN * max(1, turn["value"].count(IMAGE_TOKEN)), False))
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
