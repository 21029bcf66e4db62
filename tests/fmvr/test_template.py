"""Chat templates: Vicuna v1 and plain exactly as LLaVA-1.5 renders them, target masks."""

from __future__ import annotations

import pytest

from fmvr.template import IMAGE_TOKEN, prompt_text, render, user_turn
from fmvr.tokenizer import encode_segments

# LLaVA-1.5's conv_vicuna_v1 system prompt, typed out here independently of fmvr.template.
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava_v1_prompt(turns, add_generation_prompt=False) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (sep ' ', sep2 '</s>')."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    messages = [(roles[t["from"]], t["value"]) for t in turns]
    if add_generation_prompt:
        messages.append(("ASSISTANT", None))
    seps = [" ", "</s>"]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red circle."}],
    [
        {"from": "human", "value": "<image>\nHow many stars?"},
        {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "And circles?"},
        {"from": "gpt", "value": "None at all."},
    ],
]


def text(segments) -> str:
    return "".join(t for t, _ in segments)


def test_vicuna_v1_text_exactly():
    got = text(render("vicuna_v1", CONVERSATIONS[1]))
    assert got == (
        SYSTEM
        + " USER: <image>\nHow many stars? ASSISTANT: Two.</s>USER: And circles? ASSISTANT: None at all.</s>"
    )


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_vicuna_v1_equals_llava_get_prompt(conv):
    assert text(render("vicuna_v1", conv)) == llava_v1_prompt(conv)
    assert text(render("vicuna_v1", conv[:1], add_generation_prompt=True)) == llava_v1_prompt(conv[:1], True)


def test_prompt_text_for_inference():
    assert prompt_text("vicuna_v1", "What is this?") == SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert prompt_text("plain", "ignored") == IMAGE_TOKEN


def test_vicuna_targets_are_the_assistant_answers_only():
    segs = render("vicuna_v1", CONVERSATIONS[1])
    assert "".join(t for t, target in segs if target) == " Two.</s> None at all.</s>"
    assert all("USER" not in t and "ASSISTANT" not in t for t, target in segs if target)


def test_plain_template_as_llava_pretraining():
    # LLaVA preprocess_plain: "<image>" + caption + "\n"; the human text is dropped
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A blue square."}]
    segs = render("plain", conv)
    assert text(segs) == "<image>A blue square.\n"
    assert segs == [("<image>", False), ("A blue square.\n", True)]


def test_target_tokens_with_the_tokenizer(tiny_tokenizer):
    ids, target = encode_segments(tiny_tokenizer, render("vicuna_v1", CONVERSATIONS[1]), bos_id=1)
    assert ids[0] == 1 and not target[0] and len(ids) == len(target)
    answer = tiny_tokenizer.decode([i for i, t in zip(ids, target) if t], skip_special_tokens=False)
    assert answer == " Two.</s> None at all.</s>"
    # the ids are the whole conversation's tokens (as LLaVA tokenises it), not per-segment pieces
    whole = tiny_tokenizer.encode(llava_v1_prompt(CONVERSATIONS[1]), add_special_tokens=False).ids
    assert ids[1:] == whole
    prompt_ids, _ = encode_segments(tiny_tokenizer, render("vicuna_v1", CONVERSATIONS[0][:1], True), 1)
    assert (
        prompt_ids[1:]
        == tiny_tokenizer.encode(prompt_text("vicuna_v1", "What is this?"), add_special_tokens=False).ids
    )
    assert prompt_ids.count(4) == 1  # one <image> placeholder


def test_plain_target_tokens(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red star."}]
    ids, target = encode_segments(tiny_tokenizer, render("plain", conv), bos_id=1)
    assert ids[:2] == [1, 4] and target[:2] == [False, False]
    assert all(target[2:])
    assert tiny_tokenizer.decode(ids[2:]) == "A red star.\n"


def test_user_turn_adds_the_image_once():
    assert user_turn("Q?") == {"from": "human", "value": "<image>\nQ?"}
    assert user_turn("<image>\nQ?") == {"from": "human", "value": "<image>\nQ?"}


@pytest.mark.parametrize(
    "turns,match",
    [
        ([], "at least one turn"),
        ([{"from": "bot", "value": "x"}], "'from' must be"),
        ([{"from": "gpt", "value": "x"}], "expected a 'human' turn"),
        ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}], "expected a 'gpt' turn"),
        ([{"from": "human", "value": 3}], "'value' must be a string"),
    ],
)
def test_bad_conversations_are_rejected(turns, match):
    with pytest.raises(ValueError, match=match):
        render("vicuna_v1", turns)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'alpaca'.*vicuna_v1"):
        render("alpaca", CONVERSATIONS[0])


def test_user_turn_moves_the_image_to_the_front_like_llava():
    # LLaVA's preprocess_multimodal: "<image>\n" + value.replace("<image>", "").strip()
    assert user_turn("What is this <image> ?") == {"from": "human", "value": "<image>\nWhat is this  ?"}
    assert user_turn("Q?\n<image>") == {"from": "human", "value": "<image>\nQ?"}
