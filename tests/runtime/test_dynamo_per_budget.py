"""The other bundle shapes: a torch-dynamo decoder (the general export path, no fused ops)
and per-budget vision graphs. Greedy answers still equal PyTorch's; escalation is refused."""

from __future__ import annotations

import pytest

from runtime.bundle import BundleError
from runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
PROMPT = "What is it?"
BUDGETS = (36, 1)


@pytest.fixture(scope="module")
def dyn_pipe(tmp_path_factory):
    from export.build import build_bundle
    from export.common import tiny_source
    from export.options import LLMOptions, VisionOptions

    out, _ = build_bundle(
        tiny_source(0),
        tmp_path_factory.mktemp("dyn") / "bundle",
        tokens=BUDGETS,
        vision=VisionOptions(layout="per-budget"),
        llm=LLMOptions(quant="fp32", exporter="dynamo"),
    )
    return Pipeline.load(out, threads=1)


def test_dynamo_decoder_and_per_budget_graphs_match_pytorch(dyn_pipe, image_bytes):
    from fmvr.config import preset
    from fmvr.model import build_model
    from fmvr.tokenizer import expand_image_tokens

    assert dyn_pipe.manifest.llm.exporter == "torch-dynamo" and not dyn_pipe.vision.shared
    model = build_model(preset("tiny"), seed=0)
    for t in BUDGETS:
        ids = expand_image_tokens(dyn_pipe.prompt_ids(PROMPT), dyn_pipe.special["image"], t)
        pixels = torch.from_numpy(dyn_pipe.preprocess(image_bytes[1]))
        want = model.generate(pixels, torch.tensor([ids]), tokens=t, max_new_tokens=10)[0]
        assert dyn_pipe.ask(image_bytes[1], PROMPT, tokens=t, max_new_tokens=10).token_ids == want


def test_budgets_outside_the_bundle_are_refused(dyn_pipe, image_bytes):
    with pytest.raises(ValueError, match="valid budgets: 36, 1"):
        dyn_pipe.ask(image_bytes[0], PROMPT, tokens=576)


def test_escalation_is_refused_on_per_budget_graphs(dyn_pipe, image_bytes):
    with pytest.raises(BundleError, match="shared vision layout"):
        dyn_pipe.escalate(image_bytes[0], PROMPT, budgets=BUDGETS)
