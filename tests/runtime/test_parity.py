"""Runtime greedy answers equal PyTorch's (fmvr.model.generate) token for token, every budget.

The tiny bundle preprocesses in its vision graph (frames in); PyTorch gets fmvr.preprocess's
pixels. Greedy tokens agree either way; the embeddings are compared at 1e-4 on the exact path
(preprocess="host": PIL's pad + resize on the host, bit-identical pixels in the graph)."""

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
    return model.generate(pixels, torch.tensor([ids]), tokens=tokens, max_new_tokens=NEW)[0]


@pytest.mark.parametrize("tokens", BUDGETS)
@pytest.mark.parametrize("which", [0, 1])
def test_greedy_equals_pytorch(pipe, torch_model, image_bytes, tokens, which):
    want = torch_answer(torch_model, pipe, image_bytes[which], tokens)
    got = pipe.ask(image_bytes[which], PROMPT, tokens=tokens, max_new_tokens=NEW)
    assert got.token_ids == want
    assert got.budget == tokens and got.backend == "ort-cpu"
    assert got.answer == pipe.tokenizer.decode(want)


@pytest.fixture(scope="module")
def host_pipe(tiny_bundle):
    from runtime.pipeline import Pipeline

    return Pipeline.load(tiny_bundle, threads=1, preprocess="host")


@pytest.mark.parametrize("mode", ["host", "graph"])
def test_prompt_embeddings_match_pytorch(pipe, host_pipe, torch_model, image_bytes, mode):
    from fmvr.tokenizer import expand_image_tokens

    pipe = host_pipe if mode == "host" else pipe
    ids = pipe.prompt_ids(PROMPT)
    vp = pipe.encode(image_bytes[0], [36])
    mine = pipe.embeddings(ids, vp.features[36])  # [1, S, D]
    expanded = torch.tensor([expand_image_tokens(ids, pipe.special["image"], 36)])
    with torch.no_grad():
        pixels = torch.from_numpy(pipe.preprocess(image_bytes[0]))
        ref = torch_model.embed(expanded, torch_model.encode_image(pixels, 36)).numpy()
    if mode == "host":
        np.testing.assert_allclose(mine, ref, atol=1e-4)
        return
    # frames: a few pixels one grey level off PIL's (tests/export/test_framegraph.py); measured
    # max abs 3.2e-3 on these embeddings, 1 - cosine 2e-9
    a, b = mine.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    assert np.abs(mine - ref).max() <= 1e-2 and a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999999
