"""Importers: a local llava-hf directory, and the authors' release (LLaVA-repo state dict).

Both return (FMVRLlava, ImportReport). Key maps (source -> ours):
    llava-hf (transformers 4 and 5 layouts)           authors' release (LLaVA-repo keys)
    [model.]vision_tower.[vision_model.]*             model.vision_tower.vision_tower.vision_model.*
                                                      -> vision_tower.* (CLIPVisionModel)
    [model.]multi_modal_projector.linear_{1,2}.*      model.mm_projector.{0,2}.*  -> projector.mlp.{0,2}.*
    language_model.model.* | model.language_model.*   model.{embed_tokens,layers,norm}.*
                                                      -> language_model.model.*
    language_model.lm_head.* | lm_head.*              lm_head.*  -> language_model.lm_head.*
                                                      model.mm_projector_crosslayer.{0,2}.* -> projector.crosslayer.*
                                                      model.mm_projector_pool_<T>.<gap|mp>.* -> pyramid.stages.<T>.*
The authors' unused branches (local_gap, strip pools, mm_projector_pool_1) are reported as
ignored; recomputed buffers (position_ids, rotary inv_freq) too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmvr.checkpoint import CONFIG_FILE, empty_model, fill_model, read_weights
from fmvr.config import CASCADES, PYRAMIDS, FMVRConfig, TextConfig, VisionConfig, preset
from fmvr.model import FMVRLlava

# ---- import reports and key maps -------------------------------------------------------------


@dataclass
class ImportReport:
    """What an importer did with each source weight."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # ours, not in the source (error if essential)
    unexpected: list[str] = field(default_factory=list)  # source keys we do not understand
    ignored: list[str] = field(default_factory=list)  # source keys known and deliberately skipped
    fresh: list[str] = field(default_factory=list)  # ours, freshly initialised (e.g. new FMVR stages)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def few(xs: list[str]) -> str:
            return f"{len(xs)}" + (f" (e.g. {', '.join(xs[:3])})" if xs else "")

        parts = [f"loaded {self.loaded}", f"fresh {few(self.fresh)}", f"ignored {few(self.ignored)}"]
        parts += [f"unexpected {few(self.unexpected)}", f"missing {few(self.missing)}"]
        return f"{self.source}: " + "; ".join(parts) + "".join(f"; {n}" for n in self.notes)


_BUFFERS = re.compile(r"(\.position_ids|rotary_emb\.inv_freq)$")  # recomputed, never loaded
_LLAVA_HF_RULES = (
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.linear_1\.", "projector.mlp.0."),
    (r"^(?:model\.)?multi_modal_projector\.linear_2\.", "projector.mlp.2."),
    (r"^language_model\.model\.", "language_model.model."),  # transformers 4
    (r"^model\.language_model\.", "language_model.model."),  # transformers 5
    (r"^(?:language_model\.)?lm_head\.", "language_model.lm_head."),
)
_AUTHORS_UNUSED = re.compile(
    r"^model\.mm_projector_pool_(?:1\.|\d+\."
    r"(?:local_gap|globa_horizontal_avg|globa_vertical_avg|global_horizontal_max|global_vertial_max)\.)"
)
_AUTHORS_RULES = (
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?", "vision_tower."),
    (r"^model\.mm_projector\.", "projector.mlp."),
    (r"^model\.mm_projector_crosslayer\.", "projector.crosslayer."),
    (r"^model\.mm_projector_pool_(\d+)\.(gap|mp)\.", r"pyramid.stages.\1.\2."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.model.\1."),
    (r"^lm_head\.", "language_model.lm_head."),
)
# The authors' cross-layer fusion (from LLaVA-STF): CLIP hidden states, CLS dropped.
AUTHORS_CROSSLAYER = (-2, 21, 18, 15, 12, 9, 6, 3)


def _apply_rules(rules, key: str) -> str | None:
    if _BUFFERS.search(key):
        return "ignore"
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return None


def map_llava_hf_key(key: str) -> str | None:
    """llava-hf key (transformers 4 or 5 layout) -> ours ('vision_tower.' = our tower root)."""
    return _apply_rules(_LLAVA_HF_RULES, key)


def map_authors_key(key: str) -> str | None:
    """Authors' LLaVA-repo key -> ours, "ignore" for their unused branches, None if unknown."""
    return "ignore" if _AUTHORS_UNUSED.search(key) else _apply_rules(_AUTHORS_RULES, key)


# ---- configs from foreign directories --------------------------------------------------------


def llava_hf_config(d: Path, pyramid: str, budgets: tuple[int, ...] | None) -> FMVRConfig:
    """FMVRConfig from a llava-hf config.json (defaults filled in by transformers' LlavaConfig)."""
    from transformers import LlavaConfig

    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d} has no config.json: is it a llava-hf model directory?")
    raw = json.loads((d / CONFIG_FILE).read_text())
    if raw.get("model_type") != "llava":
        raise ValueError(
            f"{d}: model_type {raw.get('model_type')!r} is not 'llava' (LlavaForConditionalGeneration); "
            "for the authors' LLaVA-repo release use import_authors"
        )
    hf = LlavaConfig.from_dict(raw)
    v: Any = hf.vision_config
    t: Any = hf.text_config
    _require(d, v.hidden_act == "quick_gelu", f"vision hidden_act {v.hidden_act!r} (ours: quick_gelu)")
    _require(
        d,
        hf.vision_feature_select_strategy == "default",
        "vision_feature_select_strategy 'full' (ours drops CLS)",
    )
    _require(d, hf.projector_hidden_act == "gelu", f"projector_hidden_act {hf.projector_hidden_act!r}")
    _require(d, raw.get("multimodal_projector_bias", True), "a projector without bias")
    layer = hf.vision_feature_layer
    vision = VisionConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_size=v.hidden_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        layer_norm_eps=v.layer_norm_eps,
        feature_layers=(layer,) if isinstance(layer, int) else tuple(layer),
    )
    text = _text_from_hf(d, t)
    if budgets is None:
        budgets = CASCADES[pyramid].default_budgets(vision.grid)
    mean, std = _image_norm(d)
    eos = t.eos_token_id if t.eos_token_id is not None else 2
    pad = raw.get("pad_token_id", t.pad_token_id)
    return FMVRConfig(
        name=d.name,
        vision=vision,
        text=text,
        pyramid=pyramid,
        budgets=tuple(budgets),
        image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", hf.image_token_id))),
        bos_token_id=1 if t.bos_token_id is None else int(t.bos_token_id),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        pad_token_id=0 if pad is None else int(pad),
        image_mean=mean,
        image_std=std,
    ).validate()


def _text_from_hf(d: Path, t: Any) -> TextConfig:
    rope = dict(getattr(t, "rope_parameters", None) or {})
    _require(d, rope.get("rope_type", "default") == "default", f"rope scaling {rope.get('rope_type')!r}")
    _require(d, not getattr(t, "mlp_bias", False), "an MLP with bias in the language model")
    head_dim = getattr(t, "head_dim", None)
    _require(d, head_dim in (None, t.hidden_size // t.num_attention_heads), f"head_dim {head_dim}")
    return TextConfig(
        arch=t.model_type,
        hidden_size=t.hidden_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
        tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
    )


def _require(d: Path, ok: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{d}: {what} is not supported by FMVRLlava; convert the model or extend fmvr.model")


def _image_norm(d: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """image_mean/std from preprocessor_config.json when present, else FMVRConfig's CLIP values."""
    p = d / "preprocessor_config.json"
    default = FMVRConfig()
    if not p.is_file():
        return default.image_mean, default.image_std
    pp = json.loads(p.read_text())
    mean, std = pp.get("image_mean", default.image_mean), pp.get("image_std", default.image_std)
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2]))


_AUTHORS_ARCHS = {
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
}


def authors_config(
    raw: dict[str, Any], state: dict[str, torch.Tensor], base: FMVRConfig | None, report: ImportReport
) -> FMVRConfig:
    """FMVRConfig from the release's LLaVA-repo config.json, its weight shapes and `base`."""
    base = base or preset("llava-1.5-7b")
    src = report.source
    arch = _AUTHORS_ARCHS.get(raw.get("model_type", ""))
    if arch is None:
        raise ValueError(
            f"{src}: model_type {raw.get('model_type')!r} is not one of {sorted(_AUTHORS_ARCHS)}"
        )
    for key in ("model.embed_tokens.weight", "model.mm_projector.0.weight"):
        if key not in state:
            raise ValueError(f"{src}: essential weight {key} is missing; is this the authors' release?")
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu" or raw.get("rope_scaling"):
        raise ValueError(
            f"{src}: projector {raw.get('mm_projector_type')!r} / rope scaling are not supported"
        )
    if raw.get("mm_hidden_size", base.vision.hidden_size) != base.vision.hidden_size:
        raise ValueError(f"{src}: mm_hidden_size {raw['mm_hidden_size']} != base vision width; pass base=")
    vocab = int(state["model.embed_tokens.weight"].shape[0])
    if base.image_token_id >= vocab:
        report.notes.append(f"no <image> id in vocab {vocab}: grown to {base.text.vocab_size} as in llava-hf")
        vocab = base.text.vocab_size
    heads = raw["num_attention_heads"]
    text = TextConfig(
        arch=arch,
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        intermediate_size=raw["intermediate_size"],
        vocab_size=vocab,
        max_position_embeddings=raw.get("max_position_embeddings", base.text.max_position_embeddings),
        rms_norm_eps=raw.get("rms_norm_eps", base.text.rms_norm_eps),
        rope_theta=float(raw.get("rope_theta", base.text.rope_theta)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    hidden = int(state["model.mm_projector.0.weight"].shape[0])
    if "model.mm_projector_crosslayer.0.weight" in state:
        layers = base.vision.feature_layers if base.projector == "crosslayer" else AUTHORS_CROSSLAYER
        projector = {"projector": "crosslayer", "projector_hidden": hidden}
    else:  # plain mlp2x_gelu, LLaVA-1.5 width or the authors' wide one
        layers = (int(raw.get("mm_vision_select_layer", -2)),)
        projector = {
            "projector": "mlp2x_gelu",
            "projector_hidden": 0 if hidden == text.hidden_size else hidden,
        }
    report.notes.append(f"vision tower {raw.get('mm_vision_tower', '?')} taken from base {base.name!r}")
    vision = VisionConfig(**{**base.vision.__dict__, "feature_layers": tuple(layers)})
    name = Path(src).name
    return base.replace(name=name, vision=vision, text=text, **projector)


# ---- importers -------------------------------------------------------------------------------


def import_llava_hf(
    directory: str | Path, pyramid: str = "fmvr", budgets: tuple[int, ...] | None = None, strict: bool = False
) -> tuple[FMVRLlava, ImportReport]:
    """A local llava-hf directory (LlavaForConditionalGeneration.save_pretrained) -> FMVRLlava
    with freshly initialised FMVR stages (pyramid 'fmvr'), or 'm3' / 'none'."""
    d = Path(directory)
    cfg = llava_hf_config(d, pyramid, budgets)
    model = empty_model(cfg)
    report = ImportReport(source=str(d))
    ours = _remap(read_weights(d), map_llava_hf_key, model, report)
    return _finish(model, ours, report, fresh=("pyramid.",), strict=strict)


def import_authors(
    directory: str | Path, base: FMVRConfig | None = None, strict: bool = False
) -> tuple[FMVRLlava, ImportReport]:
    """The authors' release (LLaVA-repo state dict keys) -> FMVRLlava with their FMVR stages.

    `base` supplies what their config.json lacks (vision tower, special ids, budgets);
    default: the llava-1.5-7b preset. Their unused branches are reported as ignored.
    """
    d = Path(directory)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d} has no config.json (the LLaVA-repo config of the release)")
    raw = json.loads((d / CONFIG_FILE).read_text())
    state = read_weights(d)
    report = ImportReport(source=str(d))
    cfg = authors_config(raw, state, base, report)
    model = empty_model(cfg)
    ours = _remap(state, map_authors_key, model, report)
    _grow_vocab(ours, cfg.text.vocab_size, report)
    return _finish(model, ours, report, fresh=(), strict=strict)


def _grow_vocab(ours: dict[str, torch.Tensor], vocab: int, report: ImportReport) -> None:
    """LLaVA-repo models have no <image> id; add rows (the mean row) up to `vocab`, as llava-hf did."""
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in ours and ours[key].shape[0] < vocab:
            w = ours[key]  # [V0, D]
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab - w.shape[0], -1)  # [V-V0, D]
            ours[key] = torch.cat([w, extra])  # [V, D]
            report.notes.append(f"{key}: vocab {w.shape[0]} -> {vocab} (new rows = mean row)")


# ---- shared by both importers ----------------------------------------------------------------


def _remap(
    state: dict[str, torch.Tensor],
    mapper: Callable[[str], str | None],
    model: FMVRLlava,
    report: ImportReport,
) -> dict[str, torch.Tensor]:
    """Source keys -> our keys via `mapper(key) -> str | None | "ignore"`; fills the report."""
    ours: dict[str, torch.Tensor] = {}
    own = model.state_dict()
    tower = _tower_prefix(own)
    for key, t in state.items():
        target = mapper(key)
        if target == "ignore":
            report.ignored.append(key)
        elif target is None or _retower(target, tower) not in own:
            report.unexpected.append(key)
        else:
            ours[_retower(target, tower)] = t
    return ours


def _retower(key: str, tower: str) -> str:
    return tower + key[len("vision_tower.") :] if key.startswith("vision_tower.") else key


def _tower_prefix(own: dict[str, torch.Tensor]) -> str:
    """transformers 5's CLIPVisionModel has no `vision_model.` level; 4's has."""
    return (
        "vision_tower.vision_model."
        if any(k.startswith("vision_tower.vision_model.") for k in own)
        else "vision_tower."
    )


def _finish(
    model: FMVRLlava,
    ours: dict[str, torch.Tensor],
    report: ImportReport,
    fresh: tuple[str, ...],
    strict: bool,
) -> tuple[FMVRLlava, ImportReport]:
    """Load `ours` into `model`, raising on missing essentials (and on unexpected keys if strict)."""
    if strict and report.unexpected:
        raise ValueError(
            f"{report.source}: {len(report.unexpected)} unexpected weights, e.g. {report.unexpected[:5]}"
        )
    missing = fill_model(model, ours, fresh)
    if missing:
        report.missing = missing
        raise ValueError(
            f"{report.source}: {len(missing)} essential weights are missing, e.g. {missing[:5]}; "
            f"is this the right directory and config? {report.summary()}"
        )
    report.loaded = len(ours)
    report.fresh = [k for k in model.state_dict() if k.startswith(fresh) and k not in ours]
    if report.fresh:  # fresh FMVR stages take the checkpoint's dtype (e.g. fp16)
        model.pyramid.to(next(model.projector.mlp.parameters()).dtype)
    return model.eval(), report


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fmvr.checkpoint import TOKENIZER_FILE, save_checkpoint

    ap = argparse.ArgumentParser(
        prog="python -m fmvr.importers",
        description="Convert a llava-hf or the authors' directory to our checkpoint.",
    )
    ap.add_argument("layout", choices=("llava-hf", "authors"), help="what the source directory holds")
    ap.add_argument("source", type=Path, help="local model directory (config.json + weights)")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--pyramid", default="fmvr", choices=PYRAMIDS, help="llava-hf: cascade to add")
    ap.add_argument(
        "--base-preset", default="llava-1.5-7b", help="authors: preset for what their config lacks"
    )
    ap.add_argument("--strict", action="store_true", help="fail on unexpected source weights")
    ap.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    args = ap.parse_args(argv)
    if args.layout == "llava-hf":
        model, report = import_llava_hf(args.source, pyramid=args.pyramid, strict=args.strict)
    else:
        model, report = import_authors(args.source, base=preset(args.base_preset), strict=args.strict)
    tok = args.source / TOKENIZER_FILE
    save_checkpoint(model, args.out, tokenizer=tok if tok.is_file() else None, force=args.force)
    print(report.summary())
    print(
        f"wrote {args.out} (budgets {list(model.cfg.budgets)}, tokenizer {'copied' if tok.is_file() else 'none'})"
    )
    print(f"next: fmvr.checkpoint.load_checkpoint({str(args.out)!r}), or export it: python -m export --help")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
