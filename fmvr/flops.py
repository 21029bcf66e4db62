"""Analytic FLOPs, parameters and KV-cache memory per visual-token budget, from the config alone.

    python -m fmvr.flops --preset llava-1.5-7b --prompt-tokens 40 [--pyramid fmvr|m3|none]

What is counted (FLOPs = 2 x multiply-accumulates for matmuls and convolutions):
- vision tower: patch-embedding convolution, and per layer the q/k/v/o projections, the
  attention score (Q K^T) and value (P V) matmuls over N+1 positions (CLS included) and the
  MLP. Every layer the model runs is counted (all of them: hidden state -2 means the last
  layer is computed and thrown away; `vision_flops(cfg, layers=...)` counts fewer).
- projector: its linear layers over the N patch tokens.
- LLM prefill over S = T + prompt tokens: q/k/v/o (GQA-aware), the full S x S score and
  value matmuls as dense kernels compute them (no causal halving), the gated MLP, and the
  lm_head for the last position only.
- Norms, softmax, activations, RoPE, biases and embedding lookups are not counted (as in
  torch.utils.flop_counter); they are <1% of a transformer's FLOPs.
- FMVR / M3 pyramid: elementwise work, one FLOP per output element of each add, sub, mul,
  div, mean input element, k*k per average-pool output, and k*k-1 = 8 comparisons per 3x3
  max-pool output (borders included). `fmvr_stage_ops` lists every op.
Torch-free; `meta_param_counts` imports torch lazily and builds on the meta device.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fmvr import atomic
from fmvr.config import (
    PRESETS,
    PYRAMIDS,
    FMVRConfig,
    cascade_sides,
    effnet_lite0_macs,
    effnet_lite0_params,
    feature_width,
    preset,
)

PAPER_TOKENS, PAPER_REDUCTION = 36, 0.89


# ---- compute -----------------------------------------------------------------------------
def _layer_macs(seq: int, d: int, d_kv: int, mlp: int, mlp_mats: int) -> int:
    """MACs of one transformer layer over `seq` positions attending to `seq` keys."""
    proj = seq * (2 * d * d + 2 * d * d_kv)  # q, o: d x d; k, v: d x d_kv
    attn = 2 * seq * seq * d  # Q K^T and P V, heads * head_dim = d
    return proj + attn + mlp_mats * seq * d * mlp


def vision_flops(cfg: FMVRConfig, layers: int | None = None) -> int:
    """The tower for one image. CLIP: patch conv + `layers` (default: all) encoder layers;
    a CNN tower: its convolutions up to the deepest feature map (fmvr.config)."""
    v = cfg.vision
    if v.tower == "efficientnet-lite0":
        return 2 * effnet_lite0_macs(v)
    layers = v.num_layers if layers is None else layers
    seq = v.num_patches + 1  # CLS included
    conv = v.num_patches * v.hidden_size * 3 * v.patch_size * v.patch_size
    enc = layers * _layer_macs(seq, v.hidden_size, v.hidden_size, v.intermediate_size, 2)
    return 2 * (conv + enc)


def vision_layers_needed(cfg: FMVRConfig) -> int:
    """Encoder layers (CNN: blocks) a truncated tower must run to produce every feature layer."""
    n = cfg.vision.num_layers
    if cfg.vision.tower != "clip":
        return n if -1 in cfg.vision.feature_layers else max(cfg.vision.feature_layers) + 1
    return max(i if i >= 0 else n + 1 + i for i in cfg.vision.feature_layers)


def projector_flops(cfg: FMVRConfig) -> int:
    """Projector over the N patch tokens of one image."""
    n, dv, dt = cfg.vision.num_patches, feature_width(cfg), cfg.text.hidden_size
    if cfg.projector == "crosslayer":
        dv = cfg.vision.hidden_size
        k, h = len(cfg.vision.feature_layers), cfg.projector_hidden
        return 2 * n * (k * dv * dt + dt * dv + dv * h + h * dt)
    h = cfg.projector_hidden or dt
    return 2 * n * (dv * h + h * dt)


def fmvr_stage_ops(channels: int, side: int) -> dict[str, int]:
    """Elementwise FLOPs of one FMVR block on a pooled [C, side, side] map, op by op."""
    c, e = channels, channels * side * side
    return {
        "avg.mean": e,
        "avg.high=x-low": e,
        "avg.low*low_weight": c,
        "avg.1+high_weight": c,
        "avg.high*(1+hw)": e,
        "avg.a*x,*high": 2 * e,
        "avg.b*x": e,
        "avg.sum of 4 terms + x": 4 * e,
        "mp.maxpool3 (8 cmp)": 8 * e,
        "mp.low=x-high": e,
        "mp.low*low_weight": e,
        "mp.1+high_weight": c,
        "mp.high*(1+hw)": e,
        "mp.a*x,*high": 2 * e,
        "mp.b*x": e,
        "mp.sum of 4 terms": 3 * e,
        "F=gap+mp": e,
        "F(x)+x": e,
    }


def pyramid_flops(cfg: FMVRConfig, tokens: int) -> int:
    """Pyramid FLOPs for one image at budget `tokens` (0 at the full grid)."""
    c, g = cfg.text.hidden_size, cfg.grid
    if tokens == g * g:
        return 0
    if not cfg.cascade_kind.chained:  # M3: straight from the full grid
        return c * g * g  # each output averages k*k inputs: T * k*k = N per channel
    total = 0
    sides = cascade_sides(g)
    for prev, side in zip(sides, sides[1:], strict=False):
        if prev % 2:  # final odd side -> 1: mean
            total += c * prev * prev
        else:
            total += 4 * c * side * side  # 2x2 average pool
            if side * side in cfg.cascade_kind.stage_budgets(g):
                total += sum(fmvr_stage_ops(c, side).values())
        if side * side == tokens:
            break
    return total


def llm_prefill_flops(cfg: FMVRConfig, seq: int, logits: int = 1) -> int:
    """LLM prefill of `seq` positions, lm_head on the last `logits` positions."""
    t = cfg.text
    d_kv = t.num_kv_heads * t.head_dim
    layers = t.num_layers * _layer_macs(seq, t.hidden_size, d_kv, t.intermediate_size, 3)
    return 2 * (layers + logits * t.hidden_size * t.vocab_size)


def decode_flops(cfg: FMVRConfig, context: int) -> int:
    """One decode step: a new token attending to `context` cached positions and itself."""
    t = cfg.text
    d, d_kv = t.hidden_size, t.num_kv_heads * t.head_dim
    per_layer = 2 * d * d + 2 * d * d_kv + 3 * d * t.intermediate_size + 2 * (context + 1) * d
    return 2 * (t.num_layers * per_layer + d * t.vocab_size)


def kv_bytes_per_token(cfg: FMVRConfig, dtype_bytes: int = 2) -> int:
    t = cfg.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * dtype_bytes  # K and V


# ---- parameters --------------------------------------------------------------------------
def param_counts(cfg: FMVRConfig) -> dict[str, int]:
    """Parameters per part, as FMVRLlava registers them (transformers' CLIP / Llama-family)."""
    v, t = cfg.vision, cfg.text
    dv, dt, kv = v.hidden_size, t.hidden_size, t.num_kv_heads * t.head_dim
    vision = _vision_params(cfg)
    if cfg.projector == "crosslayer":
        k, h = len(v.feature_layers), cfg.projector_hidden
        proj = k * dv * dt + dt + dt * dv + dv + dv * h + h + h * dt + dt
    else:
        h = cfg.projector_hidden or dt
        proj = feature_width(cfg) * h + h + h * dt + dt
        if cfg.projector == "ln_mlp2x_gelu":
            proj += 2 * feature_width(cfg)  # LayerNorm weight and bias
    pyr = len(cfg.cascade_kind.stage_budgets(cfg.grid)) * 8 * dt
    qkv_bias = dt + 2 * kv if t.arch == "qwen2" else 0
    t_layer = 2 * dt * dt + 2 * dt * kv + qkv_bias + 3 * dt * t.intermediate_size + 2 * dt
    head = 0 if t.tie_word_embeddings else t.vocab_size * dt
    lm = t.vocab_size * dt + t.num_layers * t_layer + dt + head
    counts = {"vision_tower": vision, "projector": proj, "pyramid": pyr, "language_model": lm}
    return counts | ({"visual_norm": dt} if cfg.visual_norm else {})


def _vision_params(cfg: FMVRConfig) -> int:
    v = cfg.vision
    dv = v.hidden_size
    if v.tower == "efficientnet-lite0":
        return effnet_lite0_params(v)
    emb = dv + dv * 3 * v.patch_size**2 + (v.num_patches + 1) * dv  # CLS, conv (no bias), pos
    v_layer = 4 * (dv * dv + dv) + 2 * dv * v.intermediate_size + v.intermediate_size + dv + 4 * dv
    return emb + 2 * dv + v.num_layers * v_layer + 2 * dv  # pre/post layer norms


def meta_param_counts(cfg: FMVRConfig) -> dict[str, int]:
    """Parameter counts of the real FMVRLlava built on torch's meta device (no memory)."""
    import torch

    from fmvr.model import FMVRLlava

    with torch.device("meta"):
        model = FMVRLlava(cfg)
    params = list(model.parameters())
    if not all(p.is_meta for p in params):
        raise RuntimeError("a parameter was materialised off the meta device")
    return {name: sum(p.numel() for p in mod.parameters()) for name, mod in model.named_children()}


# ---- the table ---------------------------------------------------------------------------
def budget_row(cfg: FMVRConfig, tokens: int, prompt_tokens: int, dtype_bytes: int = 2) -> dict[str, Any]:
    seq = tokens + prompt_tokens
    row: dict[str, Any] = {
        "tokens": tokens,
        "seq_len": seq,
        "vision_flops": vision_flops(cfg),
        "projector_flops": projector_flops(cfg),
        "pyramid_flops": pyramid_flops(cfg, tokens),
        "llm_prefill_flops": llm_prefill_flops(cfg, seq),
        "kv_cache_bytes": seq * kv_bytes_per_token(cfg, dtype_bytes),
        "decode_flops_per_token": decode_flops(cfg, seq),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype_bytes),
    }
    row["total_flops"] = sum(row[k] for k in ("vision_flops", "projector_flops", "pyramid_flops"))
    row["total_flops"] += row["llm_prefill_flops"]
    return row


def budget_table(cfg: FMVRConfig, prompt_tokens: int, dtype_bytes: int = 2) -> list[dict[str, Any]]:
    """One row per budget of `cfg`; reductions are against the full grid (576 at 336 px)."""
    full = budget_row(cfg, cfg.full_budget, prompt_tokens, dtype_bytes)
    rows = []
    for t in cfg.budgets:
        row = budget_row(cfg, t, prompt_tokens, dtype_bytes)
        row["llm_reduction"] = 1 - row["llm_prefill_flops"] / full["llm_prefill_flops"]
        row["total_reduction"] = 1 - row["total_flops"] / full["total_flops"]
        rows.append(row)
    return rows


def llm_reduction(cfg: FMVRConfig, tokens: int, prompt_tokens: int) -> float:
    full = llm_prefill_flops(cfg, cfg.full_budget + prompt_tokens)
    return 1 - llm_prefill_flops(cfg, tokens + prompt_tokens) / full


def prompt_tokens_for_reduction(cfg: FMVRConfig, tokens: int, target: float) -> int:
    """Largest prompt length at which `tokens` still cuts LLM prefill FLOPs by >= target."""
    if llm_reduction(cfg, tokens, 0) < target:
        raise ValueError(f"{tokens} tokens never reach a {target:.0%} reduction")
    p = 0
    while llm_reduction(cfg, tokens, p + 1) >= target:
        p += 1
    return p


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `budget_table` rows."""
    head = (
        "| tokens | seq | vision GFLOPs | projector GFLOPs | pyramid MFLOPs | LLM prefill GFLOPs "
        "| KV cache MiB | total GFLOPs | LLM reduction | end-to-end reduction | decode GFLOPs/tok |"
    )
    lines = [head, "|" + "---:|" * 11]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['seq_len']} | {r['vision_flops'] / 1e9:.1f} "
            f"| {r['projector_flops'] / 1e9:.1f} | {r['pyramid_flops'] / 1e6:.2f} "
            f"| {r['llm_prefill_flops'] / 1e9:.1f} | {r['kv_cache_bytes'] / 2**20:.1f} "
            f"| {r['total_flops'] / 1e9:.1f} | {r['llm_reduction']:.1%} | {r['total_reduction']:.1%} "
            f"| {r['decode_flops_per_token'] / 1e9:.2f} |"
        )
    return "\n".join(lines)


def report(cfg: FMVRConfig, prompt_tokens: int, dtype_bytes: int) -> dict[str, Any]:
    """Everything the CLI prints, as one JSON-able dict."""
    out: dict[str, Any] = {
        "config": cfg.name,
        "config_hash": cfg.hash(),
        "pyramid": cfg.pyramid,
        "prompt_tokens": prompt_tokens,
        "dtype_bytes": dtype_bytes,
        "rows": budget_table(cfg, prompt_tokens, dtype_bytes),
        "params": param_counts(cfg),
        "vision_layers_run": cfg.vision.num_layers,
        "vision_layers_needed": vision_layers_needed(cfg),
    }
    if PAPER_TOKENS in cfg.cascade and cfg.full_budget == 576:
        out["paper_check"] = {
            "tokens": PAPER_TOKENS,
            "claimed_reduction": PAPER_REDUCTION,
            "llm_reduction_at_prompt": llm_reduction(cfg, PAPER_TOKENS, prompt_tokens),
            "prompt_tokens_for_claim": prompt_tokens_for_reduction(cfg, PAPER_TOKENS, PAPER_REDUCTION),
        }
    return out


def _print_report(rep: dict[str, Any]) -> None:
    print(
        f"# FLOPs per visual-token budget: {rep['config']} ({rep['pyramid']}), "
        f"{rep['prompt_tokens']} prompt tokens, KV at {rep['dtype_bytes']} bytes\n"
    )
    print(format_table(rep["rows"]))
    print("\nparameters: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in rep["params"].items()))
    print(
        f"vision tower runs {rep['vision_layers_run']} layers; the feature layers need "
        f"{rep['vision_layers_needed']}"
    )
    pc = rep.get("paper_check")
    if pc:
        print(
            f"paper: {pc['tokens']} tokens ~{pc['claimed_reduction']:.0%} fewer LLM FLOPs; here "
            f"{pc['llm_reduction_at_prompt']:.1%} at {rep['prompt_tokens']} prompt tokens; >= "
            f"{pc['claimed_reduction']:.0%} up to {pc['prompt_tokens_for_claim']} prompt tokens"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmvr.flops", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llava-1.5-7b", help=f"config preset ({', '.join(PRESETS)})")
    ap.add_argument("--config", type=Path, help="a config.json instead of a preset")
    ap.add_argument("--prompt-tokens", type=int, default=40, help="text tokens besides the image")
    ap.add_argument("--pyramid", choices=PYRAMIDS, help="override the preset's pyramid")
    ap.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV-cache element (2 = fp16)")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    ap.add_argument(
        "--meta",
        action="store_true",
        help="build the model on torch's meta device and "
        "check its parameter counts against the analytic ones (needs torch, no memory)",
    )
    args = ap.parse_args(argv)
    if args.prompt_tokens < 0 or args.dtype_bytes < 1:
        ap.error("--prompt-tokens must be >= 0 and --dtype-bytes >= 1")
    cfg = FMVRConfig.load(args.config) if args.config else preset(args.preset)
    if args.pyramid:
        cfg = preset(args.preset, pyramid=args.pyramid) if not args.config else cfg.with_pyramid(args.pyramid)
    rep = report(cfg, args.prompt_tokens, args.dtype_bytes)
    _print_report(rep)
    if args.meta:
        counted = meta_param_counts(cfg)
        rep["meta_params"] = counted
        bad = {k: (rep["params"][k], counted[k]) for k in counted if counted[k] != rep["params"][k]}
        if bad:
            print(f"error: analytic vs meta-device parameter counts differ: {bad}")
            return 1
        print(
            f"meta check: analytic parameter counts equal the meta-device model's ({sum(counted.values()):,})"
        )
    if args.json:
        atomic.write_json(args.json, rep)
        print(f"wrote {args.json}")
    print("next: python -m fmvr.flops --pyramid m3  (compare the M3 baseline), or add --meta")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
