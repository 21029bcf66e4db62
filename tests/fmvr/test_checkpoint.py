"""fmvr.checkpoint: our format (bitwise, atomic), llava-hf directories, the authors' release."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fmvr.checkpoint as ck
import fmvr.importers as imp
from fmvr.checkpoint import load_checkpoint, load_extra, save_checkpoint
from fmvr.config import preset
from fmvr.importers import ImportReport, import_authors, import_llava_hf
from fmvr.model import build_model
from fmvr.tokenizer import load_tokenizer

UNUSED = (
    "local_gap",
    "globa_horizontal_avg",
    "globa_vertical_avg",
    "global_horizontal_max",
    "global_vertial_max",
)


def _perturb(model):
    """Non-default values everywhere that matters (FMVR stages start at 0/1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.pyramid.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---- our format ------------------------------------------------------------------------------


def test_round_trip_is_bitwise(tmp_path, tiny_model, tiny_tokenizer):
    model = _perturb(tiny_model)
    out = save_checkpoint(model, tmp_path / "ck", tokenizer=tiny_tokenizer, extra={"step": 7})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "extra.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded = load_checkpoint(out)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    _assert_same_state(model, loaded)
    assert load_extra(out) == {"step": 7}
    text = "USER: <image>\nWhat is this?"
    assert load_tokenizer(out).encode(text).ids == tiny_tokenizer.encode(text).ids


def test_round_trip_keeps_dtype(tmp_path, tiny_cfg):
    model = _perturb(build_model(tiny_cfg)).to(torch.bfloat16)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "bf16"))
    assert loaded.projector.mlp[0].weight.dtype == torch.bfloat16
    _assert_same_state(model, loaded)


def test_tied_embeddings_stored_once_and_tied_after_load(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(text=dataclasses.replace(tiny_cfg.text, tie_word_embeddings=True))
    model = build_model(cfg)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    path = save_checkpoint(model, tmp_path / "tied")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.lm_head.weight" not in keys
    loaded = load_checkpoint(path)
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    _assert_same_state(model, loaded)


def test_refuses_to_overwrite(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "ck")
    with pytest.raises(FileExistsError, match="force=True"):
        save_checkpoint(tiny_model, path)
    changed = _perturb(tiny_model)
    save_checkpoint(changed, path, force=True)
    _assert_same_state(changed, load_checkpoint(path))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an FMVR checkpoint"):
        save_checkpoint(tiny_model, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_interrupted_save_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tiny_model, tmp_path / "ck")

    def broken_save(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_perturb(build_model(tiny_model.cfg)), path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    _assert_same_state(tiny_model, load_checkpoint(path))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_checkpoint(tmp_path)


# ---- llava-hf --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
    """A tiny LlavaForConditionalGeneration written by transformers itself (112 px -> 8x8 grid)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        rms_norm_eps=1e-5,
    )
    ref = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=299)
    )
    path = tmp_path_factory.mktemp("llava") / "tiny-llava-hf"
    ref.eval().save_pretrained(path)
    return ref, path


def test_llava_hf_matches_transformers(llava_hf):
    ref, path = llava_hf
    model, report = import_llava_hf(path)
    assert (model.cfg.image_token_id, model.cfg.budgets, model.cfg.grid) == (299, (64, 16, 4, 1), 8)
    assert report.missing == [] and report.unexpected == []
    assert report.fresh == [k for k in model.state_dict() if k.startswith("pyramid.")]
    assert len(report.fresh) == 2 * 2 * 4  # stages 16 and 4, two branches, four tensors
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 112, 112)
    ids = torch.tensor([[1, 5, 6] + [299] * 64 + [7, 8], [1, 9, 10] + [299] * 64 + [11, 12]])
    with torch.no_grad():
        out = ref.model.get_image_features(pixel_values=pixels)  # transformers 5: pooler_output = per image
        want = torch.stack(list(getattr(out, "pooler_output", out)))  # [2, 64, 48]
        assert torch.equal(model.encode_grid(pixels), want)  # [2, 64, 48], projector output
        logits = model(input_ids=ids, pixel_values=pixels, tokens=64).logits
        assert torch.allclose(logits, ref(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=0)
        assert model.encode_image(pixels, 4).shape == (2, 4, 48)  # fresh stages run


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("mistral", False)])
def test_llava_hf_other_language_models(tmp_path, arch, tied):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    text = AutoConfig.for_model(
        arch,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=tied,
    )
    ref = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=299)
    )
    ref.eval().save_pretrained(tmp_path / arch)
    model, _ = import_llava_hf(tmp_path / arch)
    assert (model.cfg.text.arch, model.cfg.text.tie_word_embeddings) == (arch, tied)
    lm = model.language_model
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    pixels, ids = torch.randn(1, 3, 56, 56), torch.tensor([[1, 5] + [299] * 16 + [7]])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
        assert torch.allclose(
            model(input_ids=ids, pixel_values=pixels, tokens=16).logits, want, atol=1e-5, rtol=0
        )


def _rewrite(src_dir, dst_dir, rename, shards: int = 1):
    """Copy a llava-hf directory with its keys renamed, optionally as sharded safetensors + index."""
    dst_dir.mkdir()
    (dst_dir / "config.json").write_text((src_dir / "config.json").read_text())
    state = {rename(k): v for k, v in ck.read_weights(src_dir).items()}
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(dst_dir / name))
        weight_map.update(dict.fromkeys(part, name))
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _tf5_key(k: str) -> str:
    k = re.sub(r"^language_model\.model\.", "model.language_model.", k)
    k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
    return re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", k)


def _tf4_clip_key(k: str) -> str:
    return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k)


@pytest.mark.parametrize("rename", [_tf5_key, _tf4_clip_key], ids=["transformers5", "transformers4-clip"])
def test_llava_hf_other_layouts_and_shards(llava_hf, tmp_path, rename):
    _, path = llava_hf
    base, _ = import_llava_hf(path)
    other = tmp_path / "other"
    _rewrite(path, other, rename, shards=3)
    model, report = import_llava_hf(other)
    assert report.unexpected == [] and report.loaded == len(ck.read_weights(path))
    _assert_same_state(base, model)


def test_llava_hf_from_pytorch_bin(llava_hf, tmp_path):
    """Old directories ship pytorch_model.bin: read with torch.load(weights_only=True)."""
    _, path = llava_hf
    old = tmp_path / "bin"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    torch.save(ck.read_weights(path), old / "pytorch_model.bin")
    _assert_same_state(import_llava_hf(path)[0], import_llava_hf(old)[0])
    torch.save([1, 2], old / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        import_llava_hf(old)


def test_llava_hf_other_pyramids(llava_hf):
    _, path = llava_hf
    m3, _ = import_llava_hf(path, pyramid="m3")
    assert m3.cfg.budgets == (64, 16, 4, 1) and not list(m3.pyramid.parameters())
    none, _ = import_llava_hf(path, pyramid="none")
    assert none.cfg.budgets == (64,)
    some, _ = import_llava_hf(path, budgets=(64, 16))
    assert some.cfg.budgets == (64, 16)


def test_llava_hf_missing_weight_is_an_error(llava_hf, tmp_path):
    _, path = llava_hf
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = ck.read_weights(path)
    del state["multi_modal_projector.linear_2.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"essential weights are missing.*projector\.mlp\.2\.weight"):
        import_llava_hf(broken)


def test_command_line_converts_llava_hf(llava_hf, tmp_path, capsys, tiny_tokenizer):
    _, path = llava_hf
    source = tmp_path / "with-tokenizer"
    shutil.copytree(path, source)
    (source / "tokenizer.json").write_text(tiny_tokenizer.to_str())
    assert imp.main(["llava-hf", str(source), "--out", str(tmp_path / "ck"), "--pyramid", "m3"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg.pyramid == "m3" and (tmp_path / "ck" / "tokenizer.json").is_file()
    _assert_same_state(import_llava_hf(path, pyramid="m3")[0], loaded)


def test_llava_hf_wrong_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    with pytest.raises(ValueError, match="use import_authors"):
        import_llava_hf(tmp_path)


# ---- the authors' release --------------------------------------------------------------------


def _authors_key(k: str) -> str:
    rules = (
        (r"^vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
        (r"^projector\.mlp\.", "model.mm_projector."),
        (r"^projector\.crosslayer\.", "model.mm_projector_crosslayer."),
        (r"^pyramid\.stages\.(\d+)\.", r"model.mm_projector_pool_\1."),
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    )
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, k)
        if n:
            return new
    raise KeyError(k)


def _write_authors(model, path, drop=(), add=None):
    """A directory laid out like the authors' release, built from our model with renamed keys
    plus their unused branches (and mm_projector_pool_1). Returns the unused keys."""
    cfg, channels = model.cfg, model.cfg.text.hidden_size
    state = {_authors_key(k): v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    unused = []
    for t in (144, 36, 9, 1):
        for branch in UNUSED + (("gap", "mp") if t == 1 else ()):
            for p in ("low_weight", "high_weight", "a", "b"):
                unused.append(f"model.mm_projector_pool_{t}.{branch}.{p}")
                state[unused[-1]] = torch.randn(channels, 1, 1, generator=g)
    for k in drop:
        del state[k]
    state.update(add or {})
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    t = cfg.text
    raw = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "image_aspect_ratio": "pad",
    }
    (path / "config.json").write_text(json.dumps(raw))
    return unused


def test_authors_release_loads_into_the_fmvr_stages(tmp_path, tiny_cfg):
    model = _perturb(build_model(tiny_cfg))
    unused = _write_authors(model, tmp_path / "release")
    loaded, report = import_authors(tmp_path / "release", base=tiny_cfg)
    assert isinstance(report, ImportReport)
    assert sorted(report.ignored) == sorted(unused)
    assert report.unexpected == [] and report.missing == [] and report.fresh == []
    assert loaded.cfg == tiny_cfg.replace(name="release")
    _assert_same_state(model, loaded)
    ours = dict(loaded.named_parameters())
    theirs = ck.read_weights(tmp_path / "release")
    for t in (
        144,
        36,
        9,
    ):  # one to one: pyramid.stages.T.<branch>.<p> <-> model.mm_projector_pool_T.<branch>.<p>
        for branch in ("gap", "mp"):
            for p in ("low_weight", "high_weight", "a", "b"):
                assert torch.equal(
                    ours[f"pyramid.stages.{t}.{branch}.{p}"],
                    theirs[f"model.mm_projector_pool_{t}.{branch}.{p}"],
                )


def test_authors_crosslayer_variant(tmp_path, tiny_cfg):
    vision = dataclasses.replace(tiny_cfg.vision, feature_layers=(-2, 1))
    base = tiny_cfg.replace(vision=vision, projector="crosslayer", projector_hidden=96)
    model = _perturb(build_model(base))
    _write_authors(model, tmp_path / "release")
    loaded, report = import_authors(tmp_path / "release", base=base)
    assert (loaded.cfg.projector, loaded.cfg.projector_hidden) == ("crosslayer", 96)  # width from the weights
    _assert_same_state(model, loaded)
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels, 36), model.encode_image(pixels, 36))


def test_authors_tied_embeddings_without_lm_head(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(text=dataclasses.replace(tiny_cfg.text, tie_word_embeddings=True))
    model = _perturb(build_model(cfg))
    _write_authors(model, tmp_path / "release", drop=["lm_head.weight"])
    raw = json.loads((tmp_path / "release" / "config.json").read_text())
    (tmp_path / "release" / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": True}))
    loaded, report = import_authors(tmp_path / "release", base=cfg)
    assert report.missing == [] and loaded.cfg.text.tie_word_embeddings
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    _assert_same_state(model, loaded)


def test_authors_unknown_keys_are_reported(tmp_path, tiny_cfg):
    model = build_model(tiny_cfg)
    _write_authors(model, tmp_path / "release", add={"model.something_new.weight": torch.zeros(2)})
    _, report = import_authors(tmp_path / "release", base=tiny_cfg)
    assert report.unexpected == ["model.something_new.weight"]
    assert "unexpected 1 (e.g. model.something_new.weight)" in report.summary()
    with pytest.raises(ValueError, match="1 unexpected weights"):
        import_authors(tmp_path / "release", base=tiny_cfg, strict=True)


def test_authors_missing_essential_weight(tmp_path, tiny_cfg):
    model = build_model(tiny_cfg)
    _write_authors(model, tmp_path / "a", drop=["model.mm_projector_pool_36.mp.b", "model.norm.weight"])
    with pytest.raises(ValueError, match=r"2 essential weights are missing.*pyramid\.stages\.36\.mp\.b"):
        import_authors(tmp_path / "a", base=tiny_cfg)
    _write_authors(model, tmp_path / "b", drop=["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight is missing"):
        import_authors(tmp_path / "b", base=tiny_cfg)


def test_authors_config_for_the_7b_release():
    """The real release's shapes (on the meta device): cross-layer, 16384 wide, vocab grown for <image>."""
    meta = {
        "model.embed_tokens.weight": torch.empty(32000, 4096, device="meta"),
        "model.mm_projector.0.weight": torch.empty(16384, 1024, device="meta"),
        "model.mm_projector_crosslayer.0.weight": torch.empty(4096, 8192, device="meta"),
    }
    raw = {
        "model_type": "llava_llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "mm_hidden_size": 1024,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }
    report = ImportReport(source="/x/fmvr-7b")
    cfg = imp.authors_config(raw, meta, None, report)
    assert cfg.vision == dataclasses.replace(
        preset("llava-1.5-7b").vision, feature_layers=imp.AUTHORS_CROSSLAYER
    )
    assert (cfg.projector, cfg.projector_hidden, cfg.text.vocab_size, cfg.image_token_id) == (
        "crosslayer",
        16384,
        32064,
        32000,
    )
    assert any("grown to 32064" in n for n in report.notes)


def test_grow_vocab_appends_mean_rows():
    w = torch.arange(12.0).reshape(3, 4)
    ours = {"language_model.model.embed_tokens.weight": w, "language_model.lm_head.weight": w * 2}
    imp._grow_vocab(ours, 5, ImportReport(source="x"))
    assert ours["language_model.model.embed_tokens.weight"].shape == (5, 4)
    assert torch.equal(ours["language_model.lm_head.weight"][3:], (w * 2).mean(0).expand(2, 4))
