"""Checkpoints in our own format, and the machinery the importers share.

A checkpoint is a directory, written to a staging dir then put in place in one step
(fmvr.atomic.atomic_dir: stale staging swept, free space checked first):
    config.json        FMVRConfig
    model.safetensors  every tensor of FMVRLlava.state_dict(), tied aliases stored once
    tokenizer.json     optional (tokenizers library)
    extra.json         optional, any JSON (training step, metrics, ...)

The importers of other layouts (llava-hf, the authors' release) live in fmvr.importers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fmvr import atomic
from fmvr.config import FMVRConfig
from fmvr.model import FMVRLlava
from fmvr.staging import fault_point

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
EXTRA_FILE = "extra.json"
TIED_META = "fmvr_tied"  # safetensors metadata: {"alias": "kept key"} for tied weights
_EMBED = "language_model.model.embed_tokens.weight"
_LM_HEAD = "language_model.lm_head.weight"


# ---- our format: save ------------------------------------------------------------------------


def save_checkpoint(
    model: FMVRLlava,
    path: str | Path,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write `model` (+ tokenizer, extra) as a checkpoint directory at `path`; returns the path.

    Refuses an existing path unless force=True (and then only one that is a checkpoint).
    Nothing appears at `path` unless every file was written.
    """
    path = Path(path)
    _check_target(path, force)
    state, tied = split_tied(model.state_dict())
    meta = {"format": "pt", "fmvr_config_hash": model.cfg.hash(), TIED_META: json.dumps(tied, sort_keys=True)}
    extra_text = _extra_json(extra) if extra is not None else None
    need = tensor_bytes(state.values()) + len(extra_text or "") + (8 << 20)  # + config, tokenizer
    with atomic.atomic_dir(path, need=need, what=f"checkpoint {path.name}") as tmp:
        model.cfg.save(tmp / CONFIG_FILE)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=meta)
        fault_point("checkpoint.after-weights")
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(_tokenizer_json(tokenizer))
        if extra_text is not None:
            (tmp / EXTRA_FILE).write_text(extra_text)
    return path


def tensor_bytes(tensors: Any) -> int:
    """Bytes the tensors take once written (each storage counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
    return sum(seen.values())


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once: (tensors to save, {alias: kept key}).

    Exact aliases (tied embeddings) are dropped and recorded; a tensor that merely overlaps
    another's storage is cloned, so safetensors never sees shared memory.
    """
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.cpu()
        if t.numel() and (t.untyped_storage().data_ptr() in storages or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out, tied


def _check_target(path: Path, force: bool) -> None:
    if not path.exists():
        return
    if not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it, or choose a new path")
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        raise FileExistsError(
            f"{path} exists and is not an FMVR checkpoint directory; refusing to replace it"
        )


def _tokenizer_json(tokenizer: Any) -> str:
    """A tokenizers.Tokenizer, a transformers fast tokenizer, or a tokenizer.json path -> JSON text."""
    if isinstance(tokenizer, (str, Path)):
        return Path(tokenizer).read_text()
    if hasattr(tokenizer, "backend_tokenizer"):
        tokenizer = tokenizer.backend_tokenizer
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    raise TypeError(
        f"cannot save a tokenizer of type {type(tokenizer).__name__}: pass a tokenizers.Tokenizer, "
        "a transformers fast tokenizer, or the path of a tokenizer.json"
    )


def _extra_json(extra: dict[str, Any]) -> str:
    try:
        return json.dumps(extra, indent=2, sort_keys=True) + "\n"
    except TypeError as e:
        raise TypeError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e


# ---- our format: load ------------------------------------------------------------------------


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> FMVRLlava:
    """A checkpoint directory -> FMVRLlava in eval mode, every tensor exactly as saved (dtype too)."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not an FMVR checkpoint: {name} is missing "
                "(write one with fmvr.checkpoint.save_checkpoint, or import with import_llava_hf/import_authors)"
            )
    cfg = FMVRConfig.load(path / CONFIG_FILE)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    for alias, kept in _tied_aliases(path / WEIGHTS_FILE).items():
        state[alias] = state[kept]
    model = empty_model(cfg)
    missing = fill_model(model, state)
    if missing:
        raise ValueError(
            f"{path / WEIGHTS_FILE} lacks {len(missing)} weights of this config, e.g. {missing[:5]}"
        )
    return model.to(device).eval()


def _tied_aliases(weights: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(TIED_META, "{}"))


def load_extra(path: str | Path) -> dict[str, Any]:
    """The checkpoint's extra.json, or {} when it has none."""
    p = Path(path) / EXTRA_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


# ---- shared with the importers ---------------------------------------------------------------


def empty_model(cfg: FMVRConfig) -> FMVRLlava:
    """FMVRLlava without random initialisation (fast at 7B): every weight must be loaded after.

    The pyramid's parameters are set in its constructor (zeros/ones), so they are valid.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return FMVRLlava(cfg)


def fill_model(model: FMVRLlava, state: dict[str, torch.Tensor], fresh: tuple[str, ...] = ()) -> list[str]:
    """Assign `state` (our key names) into `model`; returns the keys it did not provide.

    Keys starting with a prefix in `fresh` may be absent (they keep their constructed values).
    Shapes are checked first; the tensors are assigned, not copied, so dtypes are kept.
    """
    own = model.state_dict()
    if model.cfg.text.tie_word_embeddings and _EMBED in state:
        state = {_LM_HEAD: state[_EMBED], **state}  # tied: the head is the embedding table
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{len(unknown)} weights do not belong to this model, e.g. {unknown[:5]}")
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} weights have the wrong shape for this config (given vs expected): {bad[:5]}"
        )
    missing = [k for k in own if k not in state]
    essential = [k for k in missing if not k.startswith(fresh)]
    if essential:
        return essential
    model.load_state_dict(state, strict=False, assign=True)
    if model.cfg.text.tie_word_embeddings:
        model.language_model.tie_weights()
    return []


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face style directory: safetensors (single or sharded) preferred,
    else PyTorch .bin shards, loaded with torch.load(weights_only=True)."""
    d = Path(directory)
    files = _weight_files(d)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = load_file(str(f))
        else:
            part = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(part, dict):
                raise ValueError(f"{f} does not hold a state dict (got {type(part).__name__})")
        dup = set(part) & set(state)
        if dup:
            raise ValueError(f"{f} repeats weights of another shard, e.g. {sorted(dup)[:3]}")
        state.update(part)
    return state


def _weight_files(d: Path) -> list[Path]:
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            lost = [s for s in shards if not (d / s).is_file()]
            if lost:
                raise FileNotFoundError(f"{d / index} names shards that are not there: {lost}")
            return [d / s for s in shards]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        found = sorted(d.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {d}")
