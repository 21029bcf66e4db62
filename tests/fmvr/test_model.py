"""FMVRLlava: gradients, placeholder merge, loss, generation, other LMs, cross-layer projector."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fmvr.config import preset
from fmvr.model import build_model
from fmvr.template import render, user_turn
from fmvr.tokenizer import IGNORE_INDEX, encode_segments, expand_image_tokens, expand_with_labels

IMG = 4  # the tiny tokenizer's <image> id (preset tiny's image_token_id)


def clip_hidden(tower, pixels):
    """Every hidden state of a CLIP tower (transformers' own forward under our CLIPTower)."""
    from transformers import CLIPVisionModel

    return CLIPVisionModel.forward(tower, pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return build_model(tiny_cfg, seed=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))


def train_example(tok, cfg, tokens: int, question="What is this?", answer="A red circle."):
    turns = [user_turn(question), {"from": "gpt", "value": answer}]
    ids, target = encode_segments(tok, render(cfg.template, turns), cfg.bos_token_id)
    ids, labels = expand_with_labels(ids, target, cfg.image_token_id, tokens)
    return torch.tensor([ids]), torch.tensor([labels])


def prompt_ids(tok, cfg, tokens: int, question="What is this?"):
    ids, _ = encode_segments(tok, render(cfg.template, [user_turn(question)], True), cfg.bos_token_id)
    return torch.tensor([expand_image_tokens(ids, cfg.image_token_id, tokens)])


# ---- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 36])
def test_gradients_reach_only_trainable_parts(tiny_cfg, tiny_tokenizer, pixels, tokens):
    model = build_model(tiny_cfg, seed=1).train()
    model.trainable(("projector", "pyramid"))
    ids, labels = train_example(tiny_tokenizer, tiny_cfg, tokens)
    out = model(input_ids=ids, pixel_values=pixels[:1], tokens=tokens, labels=labels)
    out.loss.backward()
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if part in ("vision_tower", "language_model"):
            assert not p.requires_grad and p.grad is None, name
        elif part == "projector" or (tokens == 1 and part == "pyramid"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # budget 36 runs stages 144 and 36 only: stage 9 gets no gradient
    stages = model.pyramid.stages
    assert stages["36"].mp.a.grad is not None and stages["36"].mp.a.grad.abs().sum() > 0
    assert (stages["9"].gap.b.grad is None) == (tokens == 36)


def test_trainable_language_model_keeps_tower_frozen(tiny_cfg, tiny_tokenizer, pixels):
    model = build_model(tiny_cfg, seed=1).train()
    model.trainable(("projector", "pyramid", "language_model"))
    ids, labels = train_example(tiny_tokenizer, tiny_cfg, 9)
    model(input_ids=ids, pixel_values=pixels[:1], tokens=9, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0


# ---- placeholders -----------------------------------------------------------------------------
def test_expand_image_tokens_and_count_check():
    assert expand_image_tokens([1, 7, IMG, 8], IMG, 3) == [1, 7, IMG, IMG, IMG, 8]
    with pytest.raises(ValueError, match="0 image placeholders"):
        expand_image_tokens([1, 7, 8], IMG, 3)
    with pytest.raises(ValueError, match="2 image placeholders"):
        expand_image_tokens([1, IMG, 7, IMG], IMG, 3)


def test_merged_embeddings_sit_where_the_placeholders_were(model, tiny_cfg):
    t, d = 9, tiny_cfg.text.hidden_size
    ids = torch.tensor(
        [
            [1, 10, 11] + [IMG] * t + [12, 13, 14, 15],  # image in the middle
            [0, 0, 1] + [20] * 4 + [IMG] * t,  # left-padded, image at the end
        ]
    )
    feats = torch.randn(2, t, d)
    x = model.embed(ids, feats)
    table = model.language_model.get_input_embeddings().weight
    for b in range(2):
        where = (ids[b] == IMG).nonzero().flatten()
        torch.testing.assert_close(x[b, where], feats[b], rtol=0, atol=0)
        others = (ids[b] != IMG).nonzero().flatten()
        torch.testing.assert_close(x[b, others], table[ids[b, others]], rtol=0, atol=0)


@pytest.mark.parametrize("count", [8, 10, 0])
def test_wrong_placeholder_count_is_a_clear_error(model, tiny_cfg, count):
    ids = torch.tensor([[1, 10] + [IMG] * count + [12]])
    with pytest.raises(ValueError, match=r"exactly 9 image placeholder.*expand_image_tokens"):
        model.embed(ids, torch.randn(1, 9, tiny_cfg.text.hidden_size))


def test_several_images_per_row_fill_their_placeholders_in_order(model, tiny_cfg):
    t, d = 9, tiny_cfg.text.hidden_size
    ids = torch.tensor([[1] + [IMG] * t + [10] + [IMG] * t + [12], [1] + [IMG] * t + [12] * (t + 2)])
    feats = torch.randn(3, t, d)  # row 0: images 0 and 1; row 1: image 2
    x = model.embed(ids, feats)
    where0 = (ids[0] == IMG).nonzero().flatten()
    torch.testing.assert_close(x[0, where0], feats[:2].reshape(2 * t, d), rtol=0, atol=0)
    torch.testing.assert_close(x[1, (ids[1] == IMG).nonzero().flatten()], feats[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"4 image\(s\) needs exactly 9"):
        model.embed(ids, torch.randn(4, t, d))  # one image too many for the placeholders
    with pytest.raises(ValueError, match="exactly 9 image placeholder"):
        model.embed(torch.tensor([[1] + [IMG] * (t + 3) + [12]] * 2), torch.randn(2, t, d))


def test_placeholders_without_features_is_an_error(model):
    with pytest.raises(ValueError, match="no image features"):
        model.embed(torch.tensor([[1, IMG, 5]]), None)


# ---- loss and generation ----------------------------------------------------------------------
def test_loss_is_finite_and_only_on_answer_tokens(model, tiny_cfg, tiny_tokenizer, pixels):
    ids, labels = train_example(tiny_tokenizer, tiny_cfg, 36)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels[:1], tokens=36, labels=labels)
        assert torch.isfinite(out.loss)
        # the loss by hand: shifted CE over the labelled (answer) positions
        want = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(out.loss, want)
        # placeholders never contribute, even if a caller labels them
        leaky = torch.where(ids == IMG, ids, labels)
        again = model(input_ids=ids, pixel_values=pixels[:1], tokens=36, labels=leaky).loss
    torch.testing.assert_close(again, out.loss)
    assert (labels[ids == IMG] == IGNORE_INDEX).all()
    answer = tiny_tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
    assert answer == " A red circle."  # </s> is a special token: the decoder skips it


def test_pixel_values_need_tokens(model):
    with pytest.raises(ValueError, match="tokens"):
        model(input_ids=torch.tensor([[1, 5]]), pixel_values=torch.randn(1, 3, 336, 336))


def test_greedy_generate_is_deterministic_and_equals_a_no_cache_loop(model, tiny_cfg, tiny_tokenizer, pixels):
    ids = prompt_ids(tiny_tokenizer, tiny_cfg, 9)
    first = model.generate(pixels[:1], ids, tokens=9, max_new_tokens=6)[0]
    assert first == model.generate(pixels[:1], ids, tokens=9, max_new_tokens=6)[0]
    assert len(first) == 6
    with torch.no_grad():
        feats = model.encode_image(pixels[:1], 9)
        seq, manual = ids, []
        for _ in range(6):
            logits = model.language_model(inputs_embeds=model.embed(seq, feats)).logits
            manual.append(int(logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[manual[-1]]])], dim=1)
    assert first == manual


def test_generate_stops_at_eos(tiny_cfg, tiny_tokenizer, pixels):
    model = build_model(tiny_cfg, seed=0)
    ids = prompt_ids(tiny_tokenizer, tiny_cfg, 1)
    tokens = model.generate(pixels[:1], ids, tokens=1, max_new_tokens=4)[0]
    model.cfg = model.cfg.replace(eos_token_id=tokens[1])
    assert model.generate(pixels[:1], ids, tokens=1, max_new_tokens=4)[0] == tokens[:1]


def test_sampling_with_a_seed_is_reproducible(model, tiny_cfg, tiny_tokenizer, pixels):
    ids = prompt_ids(tiny_tokenizer, tiny_cfg, 36)
    kw = dict(tokens=36, max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = model.generate(pixels[:1], ids, seed=3, **kw)[0]
    assert a == model.generate(pixels[:1], ids, seed=3, **kw)[0]
    assert a != model.generate(pixels[:1], ids, seed=4, **kw)[0]


def test_encode_budgets_equals_encode_image(model, pixels, tiny_cfg):
    with torch.no_grad():
        many = model.encode_budgets(pixels, tiny_cfg.budgets)
        for t in tiny_cfg.budgets:
            assert many[t].shape == (2, t, tiny_cfg.text.hidden_size)
            torch.testing.assert_close(many[t], model.encode_image(pixels, t))
    with pytest.raises(ValueError, match="valid budgets: 576, 144, 36, 9, 1"):
        model.encode_image(pixels, 100)


def test_encode_grid_is_hidden_state_minus_2_without_cls(model, pixels):
    with torch.no_grad():
        hidden = clip_hidden(model.vision_tower, pixels)
        torch.testing.assert_close(model.encode_grid(pixels), model.projector(hidden[-2][:, 1:]))


# ---- other language models, the cross-layer projector --------------------------------------------
@pytest.mark.parametrize("arch,cls", [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_other_language_models(tiny_cfg, tiny_tokenizer, pixels, arch, cls):
    cfg = tiny_cfg.replace(text=dataclasses.replace(tiny_cfg.text, arch=arch))
    model = build_model(cfg, seed=0)
    assert type(model.language_model).__name__ == cls
    ids, labels = train_example(tiny_tokenizer, cfg, 36)
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=pixels[:1], tokens=36, labels=labels).loss
    assert torch.isfinite(loss)
    prompt = prompt_ids(tiny_tokenizer, cfg, 9)
    out = model.generate(pixels[:1], prompt, tokens=9, max_new_tokens=3)[0]
    assert out == model.generate(pixels[:1], prompt, tokens=9, max_new_tokens=3)[0] and len(out) <= 3


def test_crosslayer_projector(tiny_cfg, pixels):
    layers = (-2, 2, 1)
    vision = dataclasses.replace(tiny_cfg.vision, feature_layers=layers)
    cfg = tiny_cfg.replace(vision=vision, projector="crosslayer", projector_hidden=96)
    model = build_model(cfg, seed=0)
    assert model.projector.mlp[0].weight.shape == (96, cfg.vision.hidden_size)
    assert model.projector.crosslayer[0].weight.shape == (cfg.text.hidden_size, 3 * cfg.vision.hidden_size)
    with torch.no_grad():
        for t in (576, 36, 1):
            assert model.encode_image(pixels, t).shape == (2, t, cfg.text.hidden_size)
        hidden = clip_hidden(model.vision_tower, pixels)
        fused = torch.cat([hidden[i][:, 1:] for i in layers], dim=-1)  # [B, 576, 3 * Dv]
        torch.testing.assert_close(model.encode_grid(pixels), model.projector(fused))


def test_m3_and_none_models(tiny_tokenizer, pixels):
    for pyramid, tokens in (("m3", 9), ("none", 576)):
        cfg = preset("tiny", pyramid=pyramid)
        model = build_model(cfg, seed=0)
        ids, labels = train_example(tiny_tokenizer, cfg, tokens)
        with torch.no_grad():
            assert torch.isfinite(
                model(input_ids=ids, pixel_values=pixels[:1], tokens=tokens, labels=labels).loss
            )
    with pytest.raises(ValueError, match="valid budgets: 576$"):
        model.encode_image(pixels, 144)


# ---- visual norm ----------------------------------------------------------------------------
def test_visual_norm_puts_tokens_at_the_word_embedding_scale(tiny_cfg, pixels):
    """With visual_norm, every visual token's RMS equals the LM's word-embedding RMS at init
    (without it, the FMVR cascade grows norms ~5x per level), and the pyramid output is
    otherwise unchanged in direction."""
    cfg = tiny_cfg.replace(visual_norm=True)
    normed, plain = build_model(cfg, seed=0), build_model(tiny_cfg, seed=0)
    word_rms = normed.language_model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
    with torch.no_grad():
        a, b = normed.encode_budgets(pixels, cfg.budgets), plain.encode_budgets(pixels, cfg.budgets)
    for t in cfg.budgets:
        rms = a[t].pow(2).mean(-1).sqrt()  # [B, T]
        torch.testing.assert_close(rms, torch.full_like(rms, float(word_rms)), rtol=1e-4, atol=0)
        cos = F.cosine_similarity(a[t], b[t], dim=-1)  # [B, T]
        assert cos.min() > 0.9999
    assert float(b[9].pow(2).mean(-1).sqrt().mean()) > 10 * float(word_rms)  # what the norm prevents
    assert "visual_norm" in dict(normed.named_children())


def test_visual_norm_is_part_of_checkpoints_and_old_configs_load_without_it(tmp_path, tiny_cfg):
    from fmvr.checkpoint import load_checkpoint, save_checkpoint
    from fmvr.config import FMVRConfig

    cfg = tiny_cfg.replace(visual_norm=True)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.visual_norm.weight.mul_(3.0)  # a trained gain must survive the round trip
    save_checkpoint(model, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    torch.testing.assert_close(back.visual_norm.weight, model.visual_norm.weight)
    old = tiny_cfg.to_dict()
    del old["visual_norm"]  # a config written before the field existed
    assert FMVRConfig.from_dict(old).visual_norm is False
    assert preset("small").visual_norm is False  # measured: stage 1 learns slower with it
