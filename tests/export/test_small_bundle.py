"""The `small` geometry through export and the torch-free runtime: the pretrained
EfficientNet-Lite0 tower (384 px, 24x24 grid), SmolLM2's tokenizer, ChatML without BOS and
the placeholder id 3. The LM is cut to 2 random layers so the test stays fast; fp32 greedy
tokens must equal PyTorch's at every budget (the runtime preprocessing frames in the graph,
PyTorch on fmvr.preprocess's pixels)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

PROMPT = "What colour is the circle?"
NEW = 8


@pytest.fixture(scope="module")
def reduced_small(small_cfg):
    from fmvr.model import build_model

    text = dataclasses.replace(small_cfg.text, num_layers=2, weights="")
    return build_model(small_cfg.replace(name="small-2-layers", text=text), seed=0)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, reduced_small, small_tokenizer):
    from export.build import build_bundle
    from export.common import checkpoint_source
    from export.options import LLMOptions
    from fmvr.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("small")
    ckpt = save_checkpoint(reduced_small, root / "ckpt", tokenizer=small_tokenizer)
    src = checkpoint_source(str(ckpt))
    out, manifest = build_bundle(
        src, root / "bundle", tokens=src.model.cfg.budgets, llm=LLMOptions(quant="fp32")
    )
    return out, manifest


@pytest.fixture(scope="module")
def small_pipe(small_bundle):
    from runtime.pipeline import Pipeline

    return Pipeline.load(small_bundle[0], threads=1)


def test_manifest_records_the_tower_and_chatml(small_bundle):
    _, m = small_bundle
    cfg = m.model["config"]
    assert cfg["vision"]["tower"] == "efficientnet-lite0" and m.template == "chatml"
    assert "bos" not in m.special_tokens and m.special_tokens["image"] == 3
    assert m.preprocessing["size"] == 384
    parity = [rec for f in m.files if f.path.startswith("vision/") for rec in f.parity.values()]
    assert len(parity) == 5 and all(rec["ok"] for rec in parity)  # the tower's ONNX vs PyTorch, real photos


# In-graph preprocessing (the default export) vs the PIL path with the pretrained tower, worst of
# the frame parity images: measured 1 - cosine 4.7e-8 (576), 2.6e-8 (144), 1.3e-8 (36), 7.4e-9 (9),
# 3.0e-9 (1); pixel MAE 6.4e-6 grey levels. Bounds 10x looser:
FRAME_COSINE = {576: 0.9999995, 144: 0.9999997, 36: 0.9999998, 9: 0.99999993, 1: 0.99999997}


def test_frames_through_the_graph_match_the_pil_path_with_the_real_tower(small_bundle):
    _, m = small_bundle
    assert m.vision.frame_input and m.vision.preprocess.parity["mean_abs_error"] <= 6e-5
    for t, rec in m.file("vision/all.onnx").parity.items():
        assert rec["frames"]["min_cosine"] >= FRAME_COSINE[int(t)], (t, rec["frames"]["min_cosine"])
        assert "sklearn:flower.jpg[rotated, crop 200x500]" in rec["frames"]["images"]


def test_prompt_has_no_bos_and_one_placeholder(small_pipe, small_tokenizer):
    ids = small_pipe.prompt_ids(PROMPT)
    assert ids[0] == small_tokenizer.token_to_id("<|im_start|>") and ids.count(3) == 1


@pytest.mark.parametrize("tokens", (576, 144, 36, 9, 1))
def test_small_runtime_greedy_equals_pytorch(small_pipe, reduced_small, real_images, tokens):
    from fmvr.tokenizer import expand_image_tokens

    image = real_images[0]
    ids = expand_image_tokens(small_pipe.prompt_ids(PROMPT), 3, tokens)
    pixels = torch.from_numpy(small_pipe.preprocess(image))  # [1, 3, 384, 384]
    want = reduced_small.generate(pixels, torch.tensor([ids]), tokens=tokens, max_new_tokens=NEW)[0]
    got = small_pipe.ask(image, PROMPT, tokens=tokens, max_new_tokens=NEW)
    assert got.token_ids == want and got.budget == tokens


def test_small_shared_kv_decoder_equals_the_copy_loop_at_every_budget(small_pipe, real_images):
    dec = small_pipe.decoder
    assert dec.shared_kv  # the small bundle's decoder is onnxruntime-genai's (GroupQueryAttention)
    try:
        for tokens in (576, 144, 36, 9, 1):
            dec.shared_kv = False
            want = small_pipe.ask(real_images[0], PROMPT, tokens=tokens, max_new_tokens=NEW).token_ids
            dec.shared_kv = True
            assert small_pipe.ask(real_images[0], PROMPT, tokens=tokens, max_new_tokens=NEW).token_ids == want
    finally:
        dec.shared_kv = True


def test_the_factored_grid_is_the_projected_grid(reduced_small):
    """export.wrap.FactoredGrid (the projector's first layer per feature map, at the map's own
    resolution) gives model.encode_grid's tokens, with a LayerNorm whose gain and bias matter."""
    import copy

    from export.wrap import FactoredGrid, VisionExport

    model = copy.deepcopy(reduced_small).eval()
    with torch.no_grad():
        model.projector.norm.weight.uniform_(0.5, 1.5)
        model.projector.norm.bias.normal_(0.0, 0.1)
    assert FactoredGrid.applies(model) and VisionExport(model, (36,)).grid is not None
    x = torch.rand(2, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want, got = model.encode_grid(x), FactoredGrid(model)(x)
    assert got.shape == want.shape == (2, 576, model.cfg.text.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
