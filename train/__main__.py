"""python -m train: run one training stage (flags override a JSON --config file).

    # tiny model on the built-in benchmark (CPU, minutes)
    python -m train --out runs/tiny --steps 600 --lr 1e-3 --schedule constant --budget-mode random --cache-vision
    # real data, 2 processes (gloo on CPU / nccl on GPU)
    torchrun --nproc_per_node 2 -m train --stage stage1 --data blip_laion_cc_sbu_558k.json \\
        --image-folder images --init llava-base --out runs/s1
    # continue an interrupted run exactly
    python -m train ... --resume

Every stage runs through the stage table (train.stages.STAGES): each Stage names its runner.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fmvr.config import PYRAMIDS
from fmvr.tasks.variants import VARIANTS
from train.ckpt import same_run
from train.common import Interrupted
from train.stages import BENCH_KINDS, PYRAMID_INITS, STAGES, TrainConfig

CHOICES = {  # argparse choices, from the tables that define them
    "stage": tuple(STAGES),
    "pyramid": PYRAMIDS,
    "bench_kind": BENCH_KINDS,
    "template": ("plain", "chat"),
    "bench_qa": ("independent", "conversation"),
    "schedule": ("cosine", "constant"),
    "budget_mode": ("mean", "random"),
    "pyramid_init": PYRAMID_INITS,
    "bench_variant": VARIANTS,
}
HELP = {  # by flag_fields' name: an options record's knob as <record>_<knob>
    "stage": "training stage",
    "out": "run directory (checkpoints, log.jsonl, final/)",
    "preset": "model preset for a fresh model (ignored with --init)",
    "pyramid": "visual-token cascade (default: fmvr for a fresh model, the checkpoint's with --init; naming "
    "another with --init swaps it in, new blocks starting as --pyramid-init says: the Matryoshka adaptation of a "
    "plain-LLaVA start)",
    "pyramid_init": "a fresh model's FMVR stages: pooling (each level starts as plain 2x2 pooling, as M3's: every "
    "budget at the projector's scale) or released (the authors' code init: each level ~5x the one above)",
    "visual_norm": "a fresh model RMS-norms its visual tokens to the LM's word-embedding scale, so every budget "
    "enters the LM at one scale (ignored with --init)",
    "init": "checkpoint directory to start from (required for finetune)",
    "tokenizer": "tokenizer.json (default: the --init checkpoint's, or the tiny in-process one)",
    "data": "LLaVA-format JSON list or JSON Lines file (default: the built-in benchmark)",
    "image_folder": "folder the data file's image paths are relative to",
    "bench_n": "built-in benchmark training scenes",
    "bench_questions": "built-in stage-2 question blocks per scene: 0 all it supports (14 on detail), N a fixed "
    "subset of N per scene, one of each category first (shorter sequences: cheaper steps)",
    "bench_clips": "built-in two-frame clips trained beside the scenes (the frames category: what appeared)",
    "bench_seed": "built-in benchmark seed",
    "bench_qa": "built-in stage-2 questions: independent (blocks sharing the image, each seeing only the image; "
    "as evaluated) or conversation (one multi-turn chat, where later answers can be read off earlier ones)",
    "bench_kind": "built-in records: caption (stage 1's default), qa (the others'), or mix (every question plus a "
    "'Describe the image.' block answered by the caption, as independent blocks)",
    "template": "conversation template: plain (stage 1's default) or chat (the model's own; the others' default)",
    "strict_data": "fail on a missing/corrupt image instead of skipping it with a warning",
    "max_length": "max tokens per sample, counted with the image at its largest budget",
    "lr": "peak learning rate (0: the stage's default)",
    "projector_lr": "learning rate of the projector (and of the pyramid unless --pyramid-lr is given; 0: --lr)",
    "pyramid_lr": "the FMVR blocks' own learning rate (0: frozen; -1: as --projector-lr)",
    "bench_variant": "built-in benchmark variant: easy (3x3 layout of large objects, a digit card) or detail (10-16 "
    "objects of 12-28 px: pooling dilutes them, so the budget buys accuracy)",
    "tower_lr": "train the vision tower at this learning rate (0: frozen; the authors' --mm_vision_tower_lr 2e-5)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_ratio": "linear warmup as a fraction of all steps",
    "schedule": "cosine or constant after warmup",
    "epochs": "epochs over the data (ignored when --steps > 0)",
    "steps": "optimizer steps (overrides --epochs)",
    "batch_size": "samples per process per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping norm",
    "budget_mode": "mean: loss averaged over every budget each step; random: one random budget per step",
    "tokens": "comma-separated budgets to train, e.g. 36,9, or all (default: all of the model's)",
    "seed": "seed of the model init and the data order",
    "tower_seed": "seed of a fresh model's frozen vision tower, the same in every run (-1: use --seed)",
    "lora": "train the LLM with LoRA adapters (peft) instead of fully",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "bf16": "bf16 autocast (GPU, or a CPU with bf16 matrix units)",
    "fsdp": "FSDP2 instead of DDP under torchrun: shards LLM layers, projector, pyramid (full training at 7B)",
    "grad_checkpointing": "gradient checkpointing in the LLM (saves memory, costs compute)",
    "cache_vision": "keep frozen-tower features in RAM across epochs (images x 576 x tower width x 4 bytes: small data only)",
    "ground_position": "stage ground: each token's target also holds the words naming where it sits ('top left')",
    "ground_digit": "stage ground: the digit card's targets hold the digit too (off: ' card' alone; see train/README.md)",
    "log_every": "write log.jsonl every N steps",
    "save_every": "checkpoint every N steps (0: at the end and on Ctrl-C only)",
    "keep_last": "checkpoints to keep",
    "stop_after": "stop and save after N steps of this run (simulates an interruption)",
    "progress": "show the progress bar",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument(
        "--skip-if-done", action="store_true", help="do nothing if --out/final exists with the same config"
    )
    for name, _, f in TrainConfig.flag_fields():
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=HELP[name]
            )
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            choices = CHOICES.get(name)
            what = f"{HELP[name]}: {', '.join(choices)}" if choices else HELP[name]
            p.add_argument(
                flag,
                dest=name,
                type=kind,
                default=None,
                choices=choices,
                help=f"{what} (default {f.default!r})",
            )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = TrainConfig.from_sources(args.config, vars(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = Path(cfg.out) / "final"
    if args.skip_if_done and same_run(final, cfg):
        print(f"{final} is already trained with this config (delete it to retrain)")
        return 0
    try:
        out = cfg.stage_def().run(cfg, resume=args.resume)
    except Interrupted as e:
        print(str(e))
        return 130
    print(f"trained {cfg.stage}: {out}")
    print(f"next: python -m train.eval --checkpoint {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
