"""The LLM: a decoder ONNX over inputs_embeds + KV cache, the embedding table, the tokenizer.

Exporters (the IO contract is the same; see runtime/bundle.py LLMSection):
- genai (`auto` picks it for llama/mistral/qwen2): onnxruntime-genai's model builder run
  offline on a local HF directory with exclude_embeds=true: fused GroupQueryAttention +
  SkipSimplifiedLayerNormalization (onnxruntime contrib ops).
- dynamo: our own torch.onnx.export(dynamo=True) of export.wrap.DecoderExport, standard ops
  only: the general path for any transformers causal LM.
Quantization is a row of export.quant (the same for both exporters). The quality gate
(export.gates) runs the decoder through runtime.llm.Decoder and compares with PyTorch fp32.

A library: `python -m export.llm` (export/llm.py -> export.cli -> export.build) calls it; it
calls nothing back.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.common import ExportError
from export.options import EXPORTER_NAMES, LLMOptions
from runtime.bundle import FileEntry, LLMSection, file_entry
from runtime.llm import KEEP  # the decoder's input [1] int64: logits of the last K positions

DECODER = "llm/decoder.onnx"
EMBED = "llm/embed_tokens.npy"


def kv_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_dynamo(lm: Any, cfg: Any, path: Path, fp16: bool) -> None:
    """torch.onnx dynamo export of DecoderExport; KV given as one pytree of (key, value) pairs."""
    import copy

    import torch

    from export.wrap import DecoderExport

    t = cfg.text
    module = DecoderExport(copy.deepcopy(lm).half() if fp16 else lm).eval()
    dtype = torch.float16 if fp16 else torch.float32
    b, p, s = 2, 3, 4  # sample sizes; all dynamic below
    kv = (b, t.num_kv_heads, p, t.head_dim)  # [B, kv, P, hd]
    past = tuple((torch.zeros(kv, dtype=dtype), torch.zeros(kv, dtype=dtype)) for _ in range(t.num_layers))
    args = (torch.zeros(b, s, t.hidden_size, dtype=dtype), torch.ones(b, p + s, dtype=torch.long), past)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=65536)
    past_len, total = torch.export.Dim("past", min=0, max=65536), torch.export.Dim("total", min=1, max=131072)
    kv_dims = tuple(({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(t.num_layers))
    dyn = {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "past": kv_dims}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=18,
            dynamic_shapes=dyn,
            external_data=True,
            input_names=["inputs_embeds", "attention_mask", *kv_names(t.num_layers, "past_key_values")],
            output_names=["logits", *kv_names(t.num_layers, "present")],
            verbose=False,
        )


def export_genai(
    lm: Any,
    tokenizer: Any,
    path: Path,
    precision: str,
    target: str,
    work: Path,
    block_size: int,
    exclude_embeds: bool = True,
) -> None:
    """onnxruntime-genai's model builder, offline, from a local HF directory; exclude_embeds
    (the bundle's contract): the graph takes inputs_embeds, else input_ids (genai's own loop)."""
    hf, out = work / "hf", work / "genai"
    lm.save_pretrained(hf)
    tokenizer.save(str(hf / "tokenizer.json"))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf)]
    cmd += ["-o", str(out), "-p", precision, "-e", target, "-c", str(work / "cache")]
    embeds = "true" if exclude_embeds else "false"
    cmd += ["--extra_options", f"exclude_embeds={embeds}", f"int4_block_size={block_size}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (res.stdout + res.stderr)[-2000:]
        raise ExportError(
            f"onnxruntime-genai model builder failed (exit {res.returncode}); "
            f"retry with --exporter dynamo. Its output ends:\n{tail}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(load_model(out / "model.onnx"), path)


LOGIT_MATMULS = ("MatMul", "MatMulNBits", "Gemm")


def last_logits_only(model: Any) -> bool:
    """Make the LM head run on the last `num_logits_to_keep` positions only (a new input, [1]
    int64; runtime.llm feeds 1 when it generates): a prefill of S tokens then skips S - 1 rows
    of the head, about a fifth of a small model's prefill (the head is 49152 x 576 on
    SmolLM2-135M), and does not write [S, vocab] logits. Feeding S gives every position (the
    quality gates, Decoder.logits). False, graph unchanged, when the head is not a MatMul
    feeding `logits` (through Casts). (An overridable initializer defaulting to 1 would keep
    the input optional, but onnxruntime's IO binding cannot bind one.)"""
    from onnx import TensorProto, helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in LOGIT_MATMULS or any(i.name == KEEP for i in g.input):
        return False
    hidden = node.input[0]  # [B, S, D]
    kept = f"{hidden}/last_{KEEP}"
    g.initializer.extend(
        [
            helper.make_tensor(f"{KEEP}/ends", TensorProto.INT64, [1], [2**62]),
            helper.make_tensor(f"{KEEP}/axes", TensorProto.INT64, [1], [1]),
        ]
    )
    g.input.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, [1]))
    neg = helper.make_node("Neg", [KEEP], [f"{KEEP}/starts"], name=f"/{KEEP}/Neg")
    cut = helper.make_node(
        "Slice", [hidden, f"{KEEP}/starts", f"{KEEP}/ends", f"{KEEP}/axes"], [kept], name=f"/{KEEP}/Slice"
    )
    node.input[0] = kept
    at = list(g.node).index(node)
    g.node.insert(at, cut)
    g.node.insert(at, neg)
    return True


def load_model(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model(model: Any, path: Path) -> None:
    """Weights in `<name>.data` beside the graph (the 2 GB protobuf limit never bites)."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def make_decoder(lm: Any, cfg: Any, tokenizer: Any, final: Path, opts: LLMOptions, exporter: str) -> None:
    """The decoder at `final` (+ .data): exported in float, then quantized by the table's step,
    except where the genai builder quantizes itself (int4 for CUDA)."""
    q = opts.quantization
    work = final.parent.parent / "llm.work"
    work.mkdir(parents=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    base = work / "base.onnx"
    if exporter == "genai":
        export_genai(
            lm, tokenizer, base, q.builder_precision(opts.target), opts.target, work, opts.block_size
        )
    else:
        export_dynamo(lm, cfg, base, q.export_precision == "fp16")
    model = load_model(base)
    if not last_logits_only(model):
        warnings.warn("the decoder's LM head was not found: logits stay at every position", stacklevel=2)
    if q.needs_quantize_step(exporter, opts.target):
        assert q.quantize is not None
        model = q.quantize(model, opts.block_size, opts.target)
    save_model(model, final)
    shutil.rmtree(work)


def accuracy_level(path: Path) -> int | None:
    """The MatMulNBits accuracy_level of the decoder at `path` (None: no MatMulNBits, or unset)."""
    import onnx

    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            return next((int(a.i) for a in node.attribute if a.name == "accuracy_level"), None)
    return None


def embeds_dtype(path: Path) -> str:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inp = next(i for i in g.input if i.name == "inputs_embeds")
    return "float16" if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"


def kv_cache_mb(cfg: Any, path: Path, opts: LLMOptions) -> float:
    """The KV memory budget to record: opts.kv_cache_mb, else one request's cache at the model's
    full context (K and V, every layer, in the decoder's past_key dtype), in MB rounded up."""
    if opts.kv_cache_mb is not None:
        return float(opts.kv_cache_mb)
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    past = next(i for i in g.input if i.name.startswith("past_key_values"))
    itemsize = 2 if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else 4
    t = cfg.text
    per_position = 2 * t.num_layers * t.num_kv_heads * t.head_dim * itemsize
    return float(math.ceil(per_position * t.max_position_embeddings / 2**20))


def write_llm(model: Any, tokenizer: Any, root: Path, opts: LLMOptions) -> tuple[LLMSection, list[FileEntry]]:
    """Export, quantize and hash the decoder + embedding table into bundle dir `root`.

    The IO contract and the quality floor are checked afterwards by export.gates.llm_gate,
    through runtime.llm.Decoder."""
    cfg, lm = model.cfg, model.language_model
    exporter = opts.exporter_for(cfg.text.arch)
    final = root / DECODER
    make_decoder(lm, cfg, tokenizer, final, opts, exporter)
    table = lm.get_input_embeddings().weight.detach().float().numpy()  # [vocab, hidden]
    table = table.astype(np.float16) if embeds_dtype(final) == "float16" else table  # = inputs_embeds dtype
    np.save(root / EMBED, table)
    q = opts.quantization
    section = LLMSection(
        decoder=DECODER,
        embed_tokens=EMBED,
        num_layers=cfg.text.num_layers,
        num_kv_heads=cfg.text.num_kv_heads,
        head_dim=cfg.text.head_dim,
        hidden_size=cfg.text.hidden_size,
        vocab_size=cfg.text.vocab_size,
        quant=opts.quant,
        external_data=[DECODER + ".data"],
        exporter=EXPORTER_NAMES[exporter],
        quantization={
            "method": q.method,
            "block_size": opts.block_size if q.uses_block_size else None,
            "accuracy_level": accuracy_level(final),
            "target": opts.target,
        },
        kv_cache_mb=kv_cache_mb(cfg, final, opts),
    )
    entries = [
        file_entry(root, DECODER, "llm-decoder", precision=opts.quant),
        file_entry(root, DECODER + ".data", "llm-data", precision=opts.quant),
        file_entry(
            root,
            EMBED,
            "embed",
            precision="fp16" if table.dtype == np.float16 else "fp32",
            shapes={"embed_tokens": list(table.shape)},
        ),
    ]
    section.quantization["bytes"] = sum(e.bytes for e in entries[:2])
    return section, entries
