"""fmvr.flops: analytic counts vs torch's FlopCounterMode on the tiny model, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fmvr import flops
from fmvr.config import preset
from fmvr.model import build_model

aten = torch.ops.aten


def clip_hidden(tower, pixels):
    """Every hidden state of a CLIP tower (transformers' own forward under our CLIPTower)."""
    from transformers import CLIPVisionModel

    return CLIPVisionModel.forward(tower, pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.fixture(scope="module")
def eager_model(tiny_cfg):
    """Tiny model with eager attention: the score/value matmuls show up as counted bmm."""
    model = build_model(tiny_cfg, seed=0)
    model.vision_tower.set_attn_implementation("eager")
    model.language_model.set_attn_implementation("eager")
    return model


def counted(fn, **kw) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, **kw) as fc:
        fn()
    return fc.get_total_flops()


def test_vision_projector_llm_match_flop_counter_exactly(eager_model, tiny_cfg):
    pixels = torch.randn(1, 3, 336, 336)
    hidden = clip_hidden(eager_model.vision_tower, pixels)
    feats = hidden[-2][:, 1:]  # [1, 576, Dv]
    # conv + linear (addmm) + attention bmm; norms/softmax/GELU are not counted by either side
    assert counted(lambda: eager_model.vision_tower(pixels)) == flops.vision_flops(tiny_cfg)
    assert counted(lambda: eager_model.projector(feats)) == flops.projector_flops(tiny_cfg)
    lm = eager_model.language_model
    for seq in (1 + 40, 36 + 40, 576 + 40):
        embeds = torch.randn(1, seq, tiny_cfg.text.hidden_size)
        got = counted(lambda e=embeds: lm(inputs_embeds=e, logits_to_keep=1))
        assert got == flops.llm_prefill_flops(tiny_cfg, seq), seq


def test_sdpa_attention_counts_the_same(tiny_cfg):
    """The default sdpa path: torch has no formula for the CPU flash kernel, so we give it
    torch's own sdpa formula; the totals then equal the analytic ones too."""
    model = build_model(tiny_cfg, seed=0)

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    pixels = torch.randn(1, 3, 336, 336)
    got = counted(lambda: model.vision_tower(pixels), custom_mapping=mapping)
    assert got == flops.vision_flops(tiny_cfg)
    embeds = torch.randn(1, 76, tiny_cfg.text.hidden_size)
    got = counted(
        lambda: model.language_model(inputs_embeds=embeds, logits_to_keep=1), custom_mapping=mapping
    )
    assert got == flops.llm_prefill_flops(tiny_cfg, 76)


def test_decode_step_matches_flop_counter(eager_model, tiny_cfg):
    lm = eager_model.language_model
    with torch.no_grad():
        past = lm(inputs_embeds=torch.randn(1, 50, tiny_cfg.text.hidden_size), use_cache=True).past_key_values
    got = counted(lambda: lm(input_ids=torch.tensor([[7]]), past_key_values=past, use_cache=True))
    assert got == flops.decode_flops(tiny_cfg, 50)


def test_crosslayer_projector_flops(tiny_cfg):
    cfg = tiny_cfg.replace(projector="crosslayer", projector_hidden=96)
    cfg = cfg.replace(vision=_with_layers(cfg.vision, (-2, 2, 1)))
    model = build_model(cfg, seed=0)
    feats = torch.randn(1, 576, 3 * cfg.vision.hidden_size)
    assert counted(lambda: model.projector(feats)) == flops.projector_flops(cfg)


def _with_layers(vision, layers):
    import dataclasses

    return dataclasses.replace(vision, feature_layers=layers)


class ElementwiseCounter(TorchDispatchMode):
    """Counts elementwise FLOPs with the same rules fmvr.flops states (one per output element
    of add/sub/mul/div, one per mean input element, k*k per avg-pool and 8 per 3x3 max-pool
    output), independently of the analytic op list."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        first = out[0] if isinstance(out, tuple) else out
        if packet in (aten.add, aten.sub, aten.mul, aten.div):
            self.flops += first.numel()
        elif packet is aten.mean:
            self.flops += args[0].numel()
        elif packet is aten.avg_pool2d:
            k = args[1]
            self.flops += first.numel() * k[0] * k[-1]
        elif packet in (aten.max_pool2d_with_indices, aten.max_pool2d):
            self.flops += first.numel() * 8
        elif packet not in (aten.view, aten.transpose, aten._unsafe_view, aten.clone, aten.reshape, aten.t):
            self.unknown.add(str(func))
        return out


@pytest.mark.parametrize("pyramid", ["fmvr", "m3"])
@pytest.mark.parametrize("channels", [8, 4096])
def test_pyramid_flops_match_counted_elementwise_ops(pyramid, channels):
    from fmvr.pyramid import Pyramid

    cfg = preset("tiny", pyramid=pyramid)
    cfg = cfg.replace(text=_with_hidden(cfg.text, channels))
    pyr = Pyramid(cfg)
    feats = torch.randn(1, 576, channels)
    for t in cfg.budgets:
        counter = ElementwiseCounter()
        with torch.no_grad(), counter:
            pyr(feats, t)
        assert counter.flops == flops.pyramid_flops(cfg, t), (pyramid, t)
        assert not counter.unknown, counter.unknown


def _with_hidden(text, d):
    import dataclasses

    return dataclasses.replace(text, hidden_size=d, num_heads=4, num_kv_heads=2)


def test_7b_numbers_and_the_paper_claim():
    cfg = preset("llava-1.5-7b")
    rows = {r["tokens"]: r for r in flops.budget_table(cfg, prompt_tokens=40)}
    assert list(rows) == [576, 144, 36, 9, 1]
    assert rows[576]["llm_reduction"] == 0.0 and rows[576]["pyramid_flops"] == 0
    # KV cache: 2 (K, V) x 32 layers x 4096 x 2 bytes = 0.5 MiB per token
    assert rows[36]["kv_bytes_per_token"] == 2**19
    assert rows[36]["kv_cache_bytes"] == 76 * 2**19
    # ~13 GFLOPs per decoded token at 7B, 98,304 FMVR parameters, ~23 MFLOPs of FMVR work
    assert 13e9 < rows[36]["decode_flops_per_token"] < 14e9
    assert flops.param_counts(cfg)["pyramid"] == 98_304
    assert 20e6 < rows[1]["pyramid_flops"] < 30e6
    # the paper: 36 tokens cut LLM FLOPs ~89%; with 40 prompt tokens it is ~88%
    assert 0.87 < rows[36]["llm_reduction"] < 0.89
    p = flops.prompt_tokens_for_reduction(cfg, 36, 0.89)
    assert flops.llm_reduction(cfg, 36, p) >= 0.89 > flops.llm_reduction(cfg, 36, p + 1)
    assert rows[36]["total_reduction"] < rows[36]["llm_reduction"]  # the tower is not reduced


def test_m3_and_none_tables():
    m3 = flops.budget_table(preset("llava-1.5-7b", pyramid="m3"), 40)
    assert [r["pyramid_flops"] for r in m3] == [0] + [4096 * 576] * 4
    none = flops.budget_table(preset("llava-1.5-7b", pyramid="none"), 40)
    assert [r["tokens"] for r in none] == [576]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_param_counts_equal_meta_device_model(tiny_cfg, arch):
    import dataclasses

    cfg = tiny_cfg.replace(text=dataclasses.replace(tiny_cfg.text, arch=arch))
    assert flops.meta_param_counts(cfg) == flops.param_counts(cfg)


@pytest.mark.parametrize("variant", ["crosslayer", "m3", "none", "tied"])
def test_param_counts_of_variants(tiny_cfg, variant):
    import dataclasses

    if variant == "crosslayer":
        vision = dataclasses.replace(tiny_cfg.vision, feature_layers=(-2, 2, 1))
        cfg = tiny_cfg.replace(vision=vision, projector="crosslayer", projector_hidden=96)
    elif variant == "tied":
        cfg = tiny_cfg.replace(text=dataclasses.replace(tiny_cfg.text, tie_word_embeddings=True))
    else:
        cfg = preset("tiny", pyramid=variant)
    assert flops.meta_param_counts(cfg) == flops.param_counts(cfg)


def test_cli_7b_with_meta_check_and_json(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert (
        flops.main(["--preset", "llava-1.5-7b", "--prompt-tokens", "40", "--meta", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "| 36 | 76 |" in text and "meta check" in text
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["rows"]] == [576, 144, 36, 9, 1]
    assert data["meta_params"] == data["params"]
    assert sum(data["params"].values()) == 7_063_525_376


def test_format_table_is_markdown():
    table = flops.format_table(flops.budget_table(preset("tiny"), 10))
    lines = table.splitlines()
    assert len(lines) == 2 + 5 and all(line.startswith("|") and line.endswith("|") for line in lines)


def test_flops_config_template_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import fmvr.flops, fmvr.config, fmvr.template\n"
        "rows = fmvr.flops.budget_table(fmvr.config.preset('llava-1.5-7b'), 40)\n"
        "print(len(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


def test_wide_plain_projector_is_counted_at_its_width():
    """The authors' wide mlp2x_gelu (projector_hidden) is counted and built at that width."""
    from fmvr.config import preset
    from fmvr.flops import param_counts, projector_flops
    from fmvr.model import build_model

    cfg = preset("tiny", projector_hidden=96)
    model = build_model(cfg)
    assert model.projector.mlp[0].out_features == 96
    assert param_counts(cfg)["projector"] == sum(p.numel() for p in model.projector.parameters())
    n, dv, dt = cfg.vision.num_patches, cfg.vision.hidden_size, cfg.text.hidden_size
    assert projector_flops(cfg) == 2 * n * (dv * 96 + 96 * dt)
