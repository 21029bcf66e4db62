"""Stage `ground`: teach the projector and the cascade to hand the LM word-like tokens, before any LM step.

    python -m train --stage ground --preset small --out runs/ground --steps 200 --batch-size 32 --cache-vision
    python -m train --stage stage2 --init runs/ground/final --lora ...      # then the questions

Why a stage of its own (dev/results/recipe_experiments_small.md, F to L): from the answer loss
alone, through a frozen 30-layer LM, the projector does not learn within a CPU budget to make tokens the
LM reads (every such recipe stayed at the answer priors), while the same LM learns the questions in 30
LoRA steps when the image is replaced by a grid of word embeddings. So this stage regresses the visual
tokens straight onto such a grid, from the scene records' boxes; no LM forward, so a step costs only the
projector and the cascade (~1 s for 32 images at every budget on 2 cores).

For every budget T (a side x side grid, side = sqrt(T)), the target of token (r, c) is the sum of the
LM's input embeddings of the words covering the centre of its cell (train.tasks.cell_words):
" red" + " triangle", " card" + " 3", else " empty"; with `position`, the words naming the layout cell
(" top" + " left") are added (`--ground-position`, off by default; the stage's knobs are
train.stages.GroundOptions, TrainConfig.ground), so each token also says where it
sits, in words (the `small` tower appends fixed position channels to its features for this; the LM
sees the grid only as a sequence). Loss: mean over the step's budgets of
MSE(model.visual_tokens(...)[T], target) / (mean square of the word embeddings).

Needs scene records with boxes, so it trains on the built-in benchmark only (not --data); the tower is
frozen and its features are computed once.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train.common import (
    autocast,
    build_model_and_tokenizer,
    log_step,
    make_optimizer,
    progress_bar,
    step_indices,
)
from train.stages import TrainConfig


def word_id(tok, word: str) -> int:
    """The token that names `word` after a space: " word"'s first token, past a bare-space piece.
    (SmolLM2 splits " 3" into "Ġ" + "3": without the skip every digit would be the same space token.)"""
    enc = tok.encode(f" {word}", add_special_tokens=False)
    if len(enc.ids) > 1 and enc.tokens[0] in (" ", "Ġ", "\u2581"):  # byte-level / sentencepiece space
        return enc.ids[1]
    return enc.ids[0]


def word_grid(embeddings: torch.Tensor, tok, words: list[tuple[str, ...]]) -> torch.Tensor:
    """[len(words), D]: per cell the sum of the embeddings of its words (each word's `word_id`)."""
    cache: dict[str, int] = {}

    def wid(w: str) -> int:
        if w not in cache:
            cache[w] = word_id(tok, w)
        return cache[w]

    rows = [embeddings[[wid(w) for w in cell]].sum(0) for cell in words]
    return torch.stack(rows).detach()


def ground_targets(
    model, tok, scenes, budgets: tuple[int, ...], position: bool, digit: bool = False
) -> dict[int, torch.Tensor]:
    """{T: [n, T, D]} targets of every scene at every budget (train.tasks.cell_words)."""
    from fmvr import tasks

    table = model.language_model.get_input_embeddings().weight.detach().float()
    out = {}
    for t in budgets:
        side = math.isqrt(t)
        out[t] = torch.stack(
            [word_grid(table, tok, tasks.cell_words(s, side, position, digit)) for s in scenes]
        )
    return out


@torch.no_grad()
def tower_grid_features(model, scenes, batch: int = 16, progress: bool = True) -> torch.Tensor:
    """[n, N, Dv] float32: the frozen tower's grid features of every scene's image (float32, as the
    exported graph computes them: under bf16 autocast they are ~10 % off, see train.loss.VisionCache)."""
    from tqdm import tqdm

    from fmvr import tasks
    from fmvr.preprocess import Preprocessor
    from train.loss import tower_features

    pre = Preprocessor.from_config(model.cfg)
    out = []
    for i in tqdm(range(0, len(scenes), batch), desc="tower features", unit="batch", disable=not progress):
        px = torch.from_numpy(pre([tasks.render_scene(s) for s in scenes[i : i + batch]]))
        out.append(tower_features(model, px))
    return torch.cat(out)


def word_mean_square(model) -> torch.Tensor:
    """The mean square of the LM's input embeddings: the ground loss's unit (frozen, so computed once)."""
    return model.language_model.get_input_embeddings().weight.detach().float().pow(2).mean()


def ground_loss(
    model, feats: torch.Tensor, targets: dict[int, torch.Tensor], word_ms: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """(mean over budgets of MSE / word_ms, {T: its value}) for a batch of tower features."""
    visual = model.visual_tokens(model.projector(feats), tuple(targets))  # {T: [B, T, D]}
    parts = {t: F.mse_loss(visual[t].float(), targets[t]) / word_ms for t in targets}
    return sum(parts.values()) / len(parts), {t: float(v.detach()) for t, v in parts.items()}


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """The stage's runner (train.stages.STAGES["ground"], the signature of every runner): <out>/final."""
    return train_ground(cfg, resume)[1]


def train_ground(cfg: TrainConfig, resume: bool = False) -> tuple[torch.nn.Module, Path]:
    """Run the ground stage (one process); returns (the model, <out>/final)."""
    from fmvr import tasks
    from train.ckpt import save_model_final, trainable_named
    from train.loss import step_budgets

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or resume:
        raise ValueError("stage ground runs in one process and in one go (no torchrun, no --resume)")
    torch.manual_seed(cfg.seed)
    model, tok = build_model_and_tokenizer(cfg)
    model.train()
    model.vision_tower.eval()
    budgets_all = cfg.budget_list(model.cfg.budgets)
    scenes = list(tasks.scenes("train", cfg.bench_n, cfg.bench_seed, cfg.bench_variant))
    total = cfg.steps or max(1, int(cfg.epochs * (len(scenes) // cfg.batch_size)))
    feats = tower_grid_features(model, scenes, progress=cfg.progress)
    targets = ground_targets(
        model, tok, scenes, budgets_all, position=cfg.ground.position, digit=cfg.ground.digit
    )
    opt, sched = make_optimizer(cfg, model, total)
    params = list(trainable_named(model).values())
    word_ms = word_mean_square(model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.jsonl"
    bar = progress_bar(cfg, 0, total, 0)
    t0 = time.time()
    for step in range(total):
        budgets = step_budgets(budgets_all, cfg.budget_mode, random.Random(cfg.seed * 7919 + step))
        idx = step_indices(len(scenes), cfg.batch_size, cfg.seed, step)
        with autocast(cfg, torch.device("cpu")):
            loss, parts = ground_loss(model, feats[idx], {t: targets[t][idx] for t in budgets}, word_ms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        stats = {"loss": float(loss.detach()), "budgets": parts, "grad_norm": float(gnorm)}
        log_step(log, bar, step, stats, sched, (step + 1) * cfg.batch_size / (time.time() - t0), cfg)
    bar.close()
    final = out / "final"
    save_model_final(cfg, model, tok, final, total, {})
    return model, final
