"""Runtime greedy answers equal PyTorch's (fmvr.model.generate) token for token, every budget."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BUDGETS = (576, 144, 36, 9, 1)
PROMPT = "What is in the picture?"
NEW = 12


@pytest.fixture(scope="module")
def torch_model():
    from fmvr.config import preset
    from fmvr.model import build_model

    return build_model(preset("tiny"), seed=0)  # the seed export.build_tiny_bundle uses


def torch_answer(model, pipe, image: bytes, tokens: int) -> list[int]:
    from fmvr.tokenizer import expand_image_tokens

    ids = expand_image_tokens(pipe.prompt_ids(PROMPT), pipe.special["image"], tokens)
    pixels = torch.from_numpy(pipe.preprocess(image))  # [1, 3, S, S]
    return model.generate(pixels, torch.tensor([ids]), tokens=tokens, max_new_tokens=NEW)


@pytest.mark.parametrize("tokens", BUDGETS)
@pytest.mark.parametrize("which", [0, 1])
def test_greedy_equals_pytorch(pipe, torch_model, image_bytes, tokens, which):
    want = torch_answer(torch_model, pipe, image_bytes[which], tokens)
    got = pipe.ask(image_bytes[which], PROMPT, tokens=tokens, max_new_tokens=NEW)
    assert got.token_ids == want
    assert got.budget == tokens and got.backend == "ort-cpu"
    assert got.answer == pipe.tokenizer.decode(want)


def test_prompt_embeddings_match_pytorch(pipe, torch_model, image_bytes):
    from fmvr.tokenizer import expand_image_tokens

    ids = pipe.prompt_ids(PROMPT)
    vp = pipe.encode(image_bytes[0], [36])
    mine = pipe.embeddings(ids, vp.features[36])  # [1, S, D]
    expanded = torch.tensor([expand_image_tokens(ids, pipe.special["image"], 36)])
    with torch.no_grad():
        pixels = torch.from_numpy(pipe.preprocess(image_bytes[0]))
        ref = torch_model.embed(expanded, torch_model.encode_image(pixels, 36)).numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-4)
