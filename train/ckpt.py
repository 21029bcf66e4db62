"""Checkpoints of a training run (see train/loop.py for the layout).

<out>/ckpt-<step>/ = model/ (fmvr.checkpoint format, LoRA merged) + trainer.safetensors
(trainable tensors, LoRA adapters included) + trainer.pt (optimizer, scheduler, RNG, step;
loaded with weights_only=True) + train_config.json, written to a staging dir then put in
place in one step (fmvr.atomic; stale staging of killed runs swept, free space checked first).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch

from fmvr import atomic
from fmvr.staging import fault_point
from train.stages import TrainConfig


def trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(cfg: TrainConfig, model, tok, opt, sched, step: int, name: str | None = None) -> Path:
    """Atomically write <out>/<name or ckpt-step>/ and keep the last cfg.keep_last."""

    out = Path(cfg.out)
    final = out / (name or f"ckpt-{step:07d}")
    # a crash leaves the old or the new checkpoint, never neither; refused early when it cannot fit
    need = state_bytes(model, opt)
    with atomic.atomic_dir(final, need=need, what=f"training checkpoint {final.name}") as tmp:
        _write_state(cfg, model, tok, opt, sched, step, tmp)
        fault_point("ckpt.written")
    if name is None:
        for old in sorted(out.glob("ckpt-*"))[: -cfg.keep_last or None]:
            shutil.rmtree(old)
    return final


def state_bytes(model, opt) -> int:
    """What a checkpoint writes: the model, its trainable tensors again, the optimizer state."""
    from fmvr.checkpoint import tensor_bytes

    optim = [] if opt is None else [t for s in opt.state.values() for t in s.values()]
    return (
        tensor_bytes(model.state_dict().values())
        + tensor_bytes(trainable_named(model).values())
        + tensor_bytes(optim)
        + (16 << 20)
    )


def _write_state(cfg: TrainConfig, model, tok, opt, sched, step: int, tmp: Path) -> None:
    from safetensors.torch import save_file

    save_model(model, tmp / "model", tok, {"step": step, "stage": cfg.stage, "train_config": cfg.to_dict()})
    fault_point("ckpt.after-model")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainable_named(model).items()},
        str(tmp / "trainer.safetensors"),
    )
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    optim = None if opt is None else opt.state_dict()  # None: an FSDP run (sharded state not saved)
    torch.save(
        {"step": step, "optimizer": optim, "scheduler": sched.state_dict(), "rng": rng},
        tmp / "trainer.pt",
    )
    (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")


def save_model(model, path: Path, tok, extra: dict) -> None:
    """fmvr.checkpoint format; a LoRA model is saved merged (a plain FMVRLlava)."""
    import copy

    from fmvr.checkpoint import save_checkpoint

    if hasattr(model.language_model, "merge_and_unload"):
        model = copy.deepcopy(model)
        model.language_model = model.language_model.merge_and_unload()
    save_checkpoint(model, path, tokenizer=tok, extra=extra, force=True)  # atomic swap


def latest_checkpoint(out: str) -> Path | None:
    ckpts = sorted(Path(out).glob("ckpt-*"))
    return ckpts[-1] if ckpts else None


def load_state(path: Path, model, opt, sched) -> int:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainer.safetensors"))
    params = trainable_named(model)
    if set(weights) != set(params):
        raise ValueError(f"{path} does not match this run's trainable parameters: resume with the same flags")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    state = torch.load(path / "trainer.pt", weights_only=True)
    if state["optimizer"] is None:
        raise ValueError(
            f"{path} comes from an --fsdp run, whose optimizer state is not saved: resume is not supported"
        )
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_py_state(state["rng"]["python"]))
    return int(state["step"])


def _py_state(s):
    return tuple(tuple(x) if isinstance(x, list) else x for x in s)


def save_model_final(cfg, model, tok, final: Path, total: int, skipped: dict) -> None:
    extra = {"step": total, "stage": cfg.stage, "train_config": cfg.to_dict(), "skipped_samples": skipped}
    save_model(model, final, tok, extra)


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model on the CPU, gathered from FSDP shards (a collective when sharded)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    return out


def plain_copy(model):
    """An unsharded CPU copy of an FSDP-sharded model (for saving)."""
    from fmvr.checkpoint import empty_model, fill_model

    state = full_state(model)
    plain = empty_model(model.cfg)
    missing = fill_model(plain, state)
    if missing:
        raise RuntimeError(f"gathered state lacks {missing[:5]}")
    plain.trainable(tuple({k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad}))
    return plain


def same_run(final: Path, cfg: TrainConfig) -> bool:
    """Whether checkpoint dir `final` was trained with this config (progress/logging aside). A
    saved config this version cannot read (e.g. keys renamed since) is not the same run: warned."""
    extra = final / "extra.json"
    if not extra.is_file():
        return False
    saved = json.loads(extra.read_text()).get("train_config", {})
    try:
        saved = TrainConfig.from_dict(saved, f"{extra} (train_config)").to_dict()  # new knobs: defaults
    except (TypeError, ValueError) as e:
        warnings.warn(f"{final} is not taken as this run: {e}", stacklevel=2)
        return False
    ignore = {"progress", "stop_after", "log_every"}
    return {k: v for k, v in saved.items() if k not in ignore} == {
        k: v for k, v in cfg.to_dict().items() if k not in ignore
    }
