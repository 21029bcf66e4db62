"""What the training stages share (train.loop's stage 1/2/finetune loop and train.ground's loop):
the model and tokenizer a config asks for, the optimizer and its schedule, the data order, bf16
autocast, the progress bar and the log writer. Both loops import these from here; nothing here
knows about a particular stage (the stage table, train.stages, says which parts train)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from train.ckpt import trainable_named
from train.stages import TrainConfig


class Interrupted(Exception):
    """A run stopped early (Ctrl-C or --stop-after) after saving a checkpoint: continue with --resume."""


# ---- model and optimizer -------------------------------------------------------------------


def build_model_and_tokenizer(cfg: TrainConfig):
    """(model, tokenizer): the --init checkpoint's, or a fresh --preset model; the stage's parts
    (and the tower with --tower-lr) set trainable, LoRA and gradient checkpointing applied."""
    from fmvr.config import preset
    from fmvr.model import build_model
    from fmvr.tokenizer import load_tokenizer, preset_tokenizer

    if cfg.init:
        from fmvr.checkpoint import load_checkpoint

        model = load_checkpoint(cfg.init)
        tok = load_tokenizer(cfg.tokenizer or cfg.init)
        if cfg.pyramid and cfg.pyramid != model.cfg.pyramid:  # e.g. a plain-LLaVA start adapted to FMVR or M3
            model.with_cascade(cfg.pyramid)
            if cfg.pyramid_init == "pooling":
                model.pyramid.start_as_pooling()
    else:
        mcfg = preset(cfg.preset, pyramid=cfg.pyramid or "fmvr", visual_norm=cfg.visual_norm)
        model = build_model(mcfg, seed=cfg.seed)
        if cfg.tower_seed >= 0 and not mcfg.vision.weights:
            fixed_tower(model, cfg.tower_seed)
        if cfg.pyramid_init == "pooling":
            model.pyramid.start_as_pooling()
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else preset_tokenizer(mcfg)
    model.trainable(cfg.stage_def().parts + (("vision_tower",) if cfg.tower_lr > 0 else ()))
    if cfg.pyramid_lr == 0:
        model.pyramid.requires_grad_(False)
    if cfg.lora:
        add_lora(model, cfg)
    if cfg.grad_checkpointing:
        model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, tok


def fixed_tower(model, seed: int) -> None:
    """Re-initialise a random vision tower from its own seed: a fresh model's frozen tower then
    plays the part of a pretrained one, identical in every run whatever --seed (and cacheable)."""
    from fmvr.towers import build_tower

    torch.manual_seed(seed)
    model.vision_tower = build_tower(model.cfg.vision).eval()
    model.vision_tower.requires_grad_(False)


def add_lora(model, cfg: TrainConfig) -> None:
    """peft LoRA on every linear layer of the LLM; projector and pyramid stay fully trained."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0)
    model.language_model = get_peft_model(model.language_model, lcfg)


def part_lr(cfg: TrainConfig, name: str) -> float:
    """Learning rate of a parameter by the part it belongs to (tower / pyramid / projector / LLM)."""
    part = name.split(".")[0]
    if part == "vision_tower":
        return cfg.tower_lr
    if part == "pyramid" and cfg.pyramid_lr >= 0:
        return cfg.pyramid_lr
    if part in ("projector", "pyramid", "visual_norm"):
        return cfg.projector_lr or cfg.learning_rate
    return cfg.learning_rate


def make_optimizer(cfg: TrainConfig, model, total_steps: int):
    """(AdamW over the trainable parameters, its warmup + cosine/constant LambdaLR)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in trainable_named(model).items():
        wd = cfg.weight_decay if p.ndim >= 2 else 0.0  # matrices decay; vectors and scalars do not
        groups.setdefault((part_lr(cfg, name), wd), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
        lr=cfg.learning_rate,
    )
    warm = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---- data order --------------------------------------------------------------------------


def steps_per_epoch(n: int, global_batch: int) -> int:
    spe = n // global_batch
    if spe < 1:
        raise ValueError(
            f"{n} samples cannot fill one global batch of {global_batch}: lower --batch-size/--grad-accum"
        )
    return spe


def step_indices(n: int, global_batch: int, seed: int, step: int) -> list[int]:
    """The global batch of `step` (drop-last epochs, reshuffled per epoch from the seed)."""
    spe = steps_per_epoch(n, global_batch)
    epoch, pos = divmod(step, spe)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * global_batch : (pos + 1) * global_batch].tolist()


# ---- step helpers --------------------------------------------------------------------------


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast with --bf16, else a no-op context."""
    if cfg.bf16:  # CUDA, or a CPU with bf16 matrix units (AMX/AVX512-BF16): ~1.7x on SmolLM2 here
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress_bar(cfg: TrainConfig, rank: int, total: int, start: int):
    """A tqdm bar over the run's steps, shown on rank 0 with --progress."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=rank != 0 or not cfg.progress,
        desc=cfg.stage,
        unit="step",
        dynamic_ncols=True,
    )


def log_step(log: Path, bar, step: int, stats: dict, sched, rate: float, cfg: TrainConfig) -> None:
    """Advance the bar; every --log-every steps append a row to log.jsonl (loss, per budget, lr,
    grad norm, samples/s). `stats`: {"loss", "budgets": {T: loss}, "grad_norm"}."""
    bar.update(1)
    bar.set_postfix(loss=f"{stats['loss']:.3f}", samples_s=f"{rate:.1f}")
    if step % cfg.log_every == 0:
        row = {
            "step": step + 1,
            "loss": stats["loss"],
            "per_budget": stats["budgets"],
            "lr": sched.get_last_lr()[0],
            "grad_norm": stats["grad_norm"],
            "samples_per_s": rate,
            "time": time.time(),
        }
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
