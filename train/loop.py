"""The training loop: one process, or many with torchrun (DDP; gloo on CPU, nccl on GPU).

Data order is a pure function of (seed, step): step s uses global batch
perm_epoch[(s % steps_per_epoch) * G : ... + G] with G = batch_size * grad_accum * world,
rank r / micro-batch m taking its own slice. So `--resume` (which restores the trainable
weights, optimizer, scheduler and RNG) continues exactly where the run stopped.

The loss of a step is normalised by the step's global number of target tokens (all-reduced),
so N ranks x B samples gives the same gradient as 1 rank x N*B samples.

Checkpoints: <out>/ckpt-<step>/ = model/ (fmvr.checkpoint format, LoRA merged) +
trainer.safetensors (trainable tensors, LoRA adapters included) + trainer.pt (optimizer,
scheduler, RNG, step; loaded with weights_only=True) + train_config.json; written to a
temp dir and renamed, keeping the last N. The final model is <out>/final.

This is the runner of stages stage1, stage2 and finetune (train.stages.STAGES: "train.loop:train");
what it shares with stage ground's loop (model, optimizer, data order, bf16, bar, log) is in
train.common.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.ckpt import (
    latest_checkpoint,
    load_state,
    plain_copy,
    save_model_final,
    save_state,
    trainable_named,
)
from train.common import (
    Interrupted,
    autocast,
    build_model_and_tokenizer,
    log_step,
    make_optimizer,
    progress_bar,
    step_indices,
    steps_per_epoch,
)
from train.common import (
    add_lora as add_lora,  # re-exported: benchmarks and dev scripts import it from here
)
from train.data import Batch, Example, collate
from train.loss import MatryoshkaStep, VisionCache, step_budgets
from train.stages import TrainConfig

# ---- setup -------------------------------------------------------------------------------


def dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def make_dataset(cfg: TrainConfig, model, tok):
    from train.data import BenchDataset, LlavaDataset, read_records

    template = cfg.template_for(model.cfg.template)
    if cfg.data:
        return LlavaDataset(
            read_records(cfg.data),
            cfg.image_folder,
            tok,
            model.cfg,
            template,
            cfg.max_length,
            cfg.strict_data,
        )
    return BenchDataset(
        "train",
        cfg.bench_n,
        tok,
        model.cfg,
        template,
        cfg.data_kind,
        cfg.bench_seed,
        cfg.max_length,
        independent=cfg.bench_qa == "independent",
        clips=cfg.bench_clips,
        variant=cfg.bench_variant,
        questions=cfg.bench_questions,
    )


# ---- data order --------------------------------------------------------------------------


def rank_micro_batches(
    indices: list[int], batch_size: int, accum: int, rank: int, world: int
) -> list[list[int]]:
    """Micro-batch m of rank r: the slice (m * world + r) of the global batch."""
    return [
        indices[(m * world + rank) * batch_size : (m * world + rank + 1) * batch_size] for m in range(accum)
    ]


def load_micro(ds, idx: list[int], model_cfg, budgets, cache: VisionCache | None) -> Batch | None:
    """Tokenised examples + pixels of the images not cached yet; bad samples skipped (counted)."""
    examples: list[Example] = []
    pixels, pixel_keys = [], []
    for i in idx:
        ex = ds.example(i)
        if ex is None:
            continue
        if cache is None or any(k not in cache for k in ex.image_keys):
            pix = ds.images(i)
            if pix is None:
                continue
            pixels += pix
            pixel_keys += ex.image_keys
        examples.append(ex)
    if not examples:
        return None
    return collate(examples, pixels, model_cfg, budgets, pixel_keys if cache is not None else None)


# ---- the loop --------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or continue) a stage; returns <out>/final, or raises Interrupted after saving."""
    return train_model(cfg, resume)[1]


def train_model(cfg: TrainConfig, resume: bool = False, cache: VisionCache | None = None):
    """As `train`, returning (the trained model, <out>/final). `cache` may be shared by runs
    with the same frozen tower (same preset and tower_seed, no --init)."""
    if (runner := cfg.stage_def().runner) != f"{__name__}:train":
        raise ValueError(f"stage {cfg.stage} has its own runner, {runner}: python -m train runs it")
    rank, world, device = dist_setup()
    torch.manual_seed(cfg.seed)
    model, tok = build_model_and_tokenizer(cfg)
    model.to(device).train()
    model.vision_tower.eval()  # frozen: no dropout, fixed statistics
    cfg.budget_list(model.cfg.budgets)  # refuse budgets the model lacks before any work
    ds = make_dataset(cfg, model, tok)
    gb = cfg.batch_size * cfg.grad_accum * world
    total = cfg.steps or max(1, int(cfg.epochs * steps_per_epoch(len(ds), gb)))
    if resume and cfg.fsdp:
        raise ValueError(
            "--resume is not supported with --fsdp yet (its sharded optimizer state is not saved)"
        )
    if cache is None and cfg.cache_vision:
        cache = VisionCache()
    runner = MatryoshkaStep(model, cache)
    ddp = _wrap_ddp(runner, cfg, world, device)  # before the optimizer: FSDP replaces the parameters
    opt, sched = make_optimizer(cfg, model, total)
    start = 0
    if resume and (ck := latest_checkpoint(cfg.out)) is not None:
        start = load_state(ck, model, opt, sched)
    run = Run(cfg, ddp, runner, ds, opt, sched, rank, world, device)
    stop = _install_sigint()
    bar = progress_bar(cfg, rank, total, start)
    log = Path(cfg.out) / "log.jsonl"
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for done_here, step in enumerate(range(start, total), start=1):
        stats = train_step(run, step)
        if rank == 0:
            rate = done_here * gb / (time.time() - t0)
            log_step(log, bar, step, stats, sched, rate, cfg)
        last = step + 1 == total
        interrupted = stop["flag"] or (cfg.stop_after and done_here >= cfg.stop_after)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or interrupted or last:
            _save_all(cfg, model, tok, opt, sched, step + 1, rank, world)
        if interrupted and not last:
            bar.close()
            raise Interrupted(f"stopped after step {step + 1}; continue with --resume")
    bar.close()
    final = Path(cfg.out) / "final"
    if cfg.fsdp and world > 1:
        model = plain_copy(model)  # collective: every rank gathers the full weights
    if rank == 0:
        if ds.skipped:
            print(
                f"skipped samples (rank 0): {dict(ds.skipped)}; use --strict-data to stop on them instead",
                flush=True,
            )
        save_model_final(cfg, model, tok, final, total, dict(ds.skipped))
    _barrier(world)
    return model, final


@dataclass(frozen=True)
class Run:
    """What every step of one training run uses."""

    cfg: TrainConfig
    ddp: Any  # the runner, wrapped by DDP/FSDP under torchrun
    runner: MatryoshkaStep
    ds: Any  # a dataset with example(i) / image(i)
    opt: Any
    sched: Any
    rank: int
    world: int
    device: torch.device


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (all micro-batches of this rank); returns the loss statistics."""
    cfg, ddp, runner, ds, opt, sched = run.cfg, run.ddp, run.runner, run.ds, run.opt, run.sched
    rank, world, device = run.rank, run.world, run.device
    budgets_all = cfg.budget_list(runner.model.cfg.budgets)
    budgets = step_budgets(budgets_all, cfg.budget_mode, random.Random(cfg.seed * 7919 + step))
    gb = cfg.batch_size * cfg.grad_accum * world
    idx = step_indices(len(ds), gb, cfg.seed, step)
    micro = [
        load_micro(ds, m, runner.model.cfg, budgets, runner.cache)
        for m in rank_micro_batches(idx, cfg.batch_size, cfg.grad_accum, rank, world)
    ]
    micro = [_to(b, device) for b in micro if b is not None]
    n_targets = _all_sum(sum(b.num_targets() for b in micro), world)
    if n_targets == 0:
        raise RuntimeError(f"step {step}: no target tokens in the global batch (every sample skipped?)")
    opt.zero_grad(set_to_none=True)
    loss_sum, parts_sum = 0.0, dict.fromkeys(budgets, 0.0)
    for k, b in enumerate(micro):
        sync = k == len(micro) - 1
        with _maybe_no_sync(ddp, sync), autocast(cfg, device):
            loss, parts = ddp(b, budgets, n_targets / world)  # DDP averages over ranks: /world undone here
        loss.backward()
        loss_sum += float(loss.detach()) / world
        for t, v in parts.items():
            parts_sum[t] += v / world
    if not micro and world > 1:  # keep collective calls matched: contribute zero gradients
        (sum(p.sum() * 0 for p in trainable_named(runner.model).values()) + 0).backward()
    gnorm = torch.nn.utils.clip_grad_norm_(list(trainable_named(runner.model).values()), cfg.max_grad_norm)
    opt.step()
    sched.step()
    return {
        "loss": _all_sum(loss_sum, world),
        "budgets": {t: _all_sum(v, world) for t, v in parts_sum.items()},
        "grad_norm": float(gnorm),
    }


# ---- small helpers -----------------------------------------------------------------------


def _to(b: Batch, device) -> Batch:
    if device.type == "cpu":
        return b
    pb = {t: tuple(x.to(device) for x in v) for t, v in b.per_budget.items()}
    pix = None if b.pixel_values is None else b.pixel_values.to(device)
    return Batch(b.keys, b.indices, pix, pb, b.pixel_keys)


def _wrap_ddp(runner, cfg: TrainConfig, world: int, device):
    if world == 1:
        return runner
    if cfg.fsdp:
        return _shard(runner)
    from torch.nn.parallel import DistributedDataParallel as DDP

    unused = cfg.budget_mode == "random"  # FMVR stages of unused budgets get no gradient
    return DDP(
        runner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
    )


def _shard(runner):
    """FSDP2: one group per LLM decoder layer, the rest in the root group; the frozen tower is
    left replicated (the vision cache calls it outside the step's forward)."""
    from torch.distributed.fsdp import fully_shard

    for layer in runner.model.language_model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(runner, ignored_params=set(runner.model.vision_tower.parameters()))
    return runner


def _maybe_no_sync(ddp, sync: bool):
    import contextlib

    return ddp.no_sync() if (not sync and hasattr(ddp, "no_sync")) else contextlib.nullcontext()


def _all_sum(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _save_all(cfg, model, tok, opt, sched, step, rank, world) -> None:
    if cfg.fsdp and world > 1:
        plain = plain_copy(model)  # collective: every rank gathers
        if rank == 0:
            save_state(cfg, plain, tok, None, sched, step)
    elif rank == 0:
        save_state(cfg, model, tok, opt, sched, step)
    _barrier(world)


def _install_sigint() -> dict:
    """Ctrl-C sets a flag; the loop saves after the current step and exits cleanly."""
    state = {"flag": False}

    def handler(signum, frame):
        if state["flag"]:
            raise KeyboardInterrupt
        state["flag"] = True
        print(
            "\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)",
            flush=True,
        )

    signal.signal(signal.SIGINT, handler)
    return state
