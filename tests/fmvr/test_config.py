"""FMVRConfig: presets, JSON round trip, validation errors, hash stability."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fmvr.config import FMVRConfig, TextConfig, VisionConfig, cascade_budgets, cascade_sides, preset


def variants():
    tiny = preset("tiny")
    cross = tiny.replace(
        vision=dataclasses.replace(tiny.vision, feature_layers=(-2, 2, 1)),
        projector="crosslayer",
        projector_hidden=96,
    )
    return [
        tiny,
        preset("llava-1.5-7b"),
        preset("tiny", pyramid="m3"),
        preset("tiny", pyramid="none"),
        preset("tiny", budgets=(144, 9)),
        cross,
        tiny.replace(text=dataclasses.replace(tiny.text, arch="qwen2", tie_word_embeddings=True)),
    ]


@pytest.mark.parametrize("cfg", variants(), ids=lambda c: f"{c.name}-{c.pyramid}-{c.projector}-{c.text.arch}")
def test_json_round_trip(cfg, tmp_path):
    back = FMVRConfig.from_json(cfg.to_json())
    assert back == cfg and back.hash() == cfg.hash()
    assert isinstance(back.budgets, tuple) and isinstance(back.vision.feature_layers, tuple)
    cfg.save(tmp_path / "config.json")
    assert FMVRConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["budgets"] == list(cfg.budgets)


def test_cascades():
    assert cascade_sides(24) == (24, 12, 6, 3, 1)
    assert cascade_budgets(24) == (576, 144, 36, 9, 1)
    assert cascade_budgets(16) == (256, 64, 16, 4, 1)
    assert cascade_sides(20) == (20, 10, 5, 1)
    assert cascade_sides(7) == (7, 1)
    assert cascade_sides(1) == (1,)
    with pytest.raises(ValueError, match="grid side"):
        cascade_sides(0)


def test_tiny_preset_has_the_real_llava_geometry():
    cfg = preset("tiny")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.grid) == (336, 14, 24)
    assert cfg.budgets == cfg.cascade == (576, 144, 36, 9, 1)
    assert cfg.vision.feature_layers == (-2,) and cfg.projector == "mlp2x_gelu" and cfg.pyramid == "fmvr"
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.image_token_id) == (0, 1, 2, 4)
    assert cfg.template == "vicuna_v1"


def test_tiny_special_ids_match_the_tiny_tokenizer(tiny_tokenizer):
    cfg = preset("tiny")
    assert tiny_tokenizer.token_to_id("<image>") == cfg.image_token_id
    assert tiny_tokenizer.token_to_id("</s>") == cfg.eos_token_id
    assert tiny_tokenizer.token_to_id("<s>") == cfg.bos_token_id
    assert tiny_tokenizer.get_vocab_size() <= cfg.text.vocab_size


def test_llava_7b_preset_is_llava_15_7b_hf():
    cfg = preset("llava-1.5-7b")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (
        336,
        14,
        1024,
        24,
        16,
        4096,
    )
    assert (t.arch, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == ("llama", 4096, 32, 32, 32)
    assert (t.intermediate_size, t.vocab_size, cfg.image_token_id) == (11008, 32064, 32000)
    assert cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert cfg.image_std == (0.26862954, 0.26130258, 0.27577711)


def test_preset_changes_and_unknown_name():
    assert preset("tiny", pyramid="none").budgets == (576,)
    assert preset("tiny", pyramid="m3").budgets == (576, 144, 36, 9, 1)
    with pytest.raises(ValueError, match="unknown preset 'llava-13b'.*llava-1.5-7b"):
        preset("llava-13b")


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(budgets=(576, 100)), r"budgets \[100\] not in the cascade \(576, 144, 36, 9, 1\)"),
        (dict(budgets=(36, 144)), "sorted largest first"),
        (dict(budgets=(36, 36)), "distinct"),
        (dict(budgets=()), "budgets is empty"),
        (dict(pyramid="none", budgets=(576, 36)), "pyramid 'none' serves only 576"),
        (dict(pyramid="matryoshka"), "pyramid 'matryoshka' not in"),
        (dict(projector="mlp3x"), "projector 'mlp3x' not in"),
        (dict(projector="crosslayer"), "needs projector_hidden > 0"),
        (dict(image_token_id=5000), "image_token_id 5000 outside vocab 1024"),
        (dict(text=TextConfig(arch="gpt2")), "text arch 'gpt2'"),
        (dict(text=TextConfig(num_heads=32, num_kv_heads=5)), "multiple of num_kv_heads"),
        (dict(vision=VisionConfig(image_size=330)), "not a multiple of patch_size"),
        (dict(vision=VisionConfig(feature_layers=(-2, 30))), "feature layer 30 outside"),
        (dict(vision=VisionConfig(feature_layers=(-2, 3))), "'mlp2x_gelu' takes one CLIP feature layer"),
    ],
)
def test_validate_errors(changes, match):
    base = preset("llava-1.5-7b") if "text" in changes or "vision" in changes else preset("tiny")
    with pytest.raises(ValueError, match=match):
        base.replace(**changes)


def test_validate_names_the_config_and_every_problem():
    with pytest.raises(ValueError, match="^invalid FMVR config 'tiny': ") as err:
        preset("tiny").replace(budgets=(100,), projector="nope")
    assert "projector 'nope'" in str(err.value) and "budgets [100]" in str(err.value)


def test_check_budget(tiny_cfg):
    assert tiny_cfg.check_budget(36) == 36
    with pytest.raises(ValueError, match="100 visual tokens .*valid budgets: 576, 144, 36, 9, 1"):
        tiny_cfg.check_budget(100)


def test_from_dict_rejects_unknown_keys_and_bad_values(tiny_cfg):
    d = tiny_cfg.to_dict()
    with pytest.raises(ValueError, match=r"unknown config keys \['tokens'\]"):
        FMVRConfig.from_dict({**d, "tokens": 36})
    with pytest.raises(ValueError, match="not in the cascade"):
        FMVRConfig.from_dict({**d, "budgets": [100]})


def test_frozen(tiny_cfg):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_cfg.pyramid = "m3"


def test_hash_is_stable_and_sensitive(tiny_cfg):
    h = tiny_cfg.hash()
    assert len(h) == 64 and int(h, 16) >= 0
    # independent of key order and of the process (string hashing is randomised per process)
    shuffled = dict(reversed(list(json.loads(tiny_cfg.to_json()).items())))
    assert FMVRConfig.from_dict(shuffled).hash() == h
    code = "from fmvr.config import preset; print(preset('tiny').hash())"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        )
        assert out.stdout.strip() == h
    assert preset("tiny", pyramid="m3").hash() != h
    assert tiny_cfg.replace(image_mean=(0.5, 0.5, 0.5)).hash() != h
    assert preset("tiny", budgets=(576, 36)).hash() != h
