"""The LLM: a decoder ONNX over inputs_embeds + KV cache, the embedding table, the tokenizer.

    python -m export.llm --checkpoint CKPT --quant int4|int8|fp16|fp32 --target cpu|cuda
                         --out BUNDLE [--exporter auto|genai|dynamo] [--block-size 32]

Exporters (the IO contract is the same; see runtime/bundle.py LLMSection):
- genai (preferred, `auto` picks it for llama/mistral/qwen2): onnxruntime-genai's model
  builder run offline on a local HF directory with exclude_embeds=true: fused
  GroupQueryAttention + SkipSimplifiedLayerNormalization (onnxruntime contrib ops).
- dynamo: our own torch.onnx.export(dynamo=True) of export.wrap.DecoderExport, standard ops
  only: the general path for any transformers causal LM.
Quantization, the same for both: onnxruntime's MatMulNBitsQuantizer, weight-only, symmetric
blocks of --block-size: int4, or int8 (CPU provider; float activations, since SmolLM2's
outlier activations break per-tensor dynamic int8).
The quality record (llm_check) compares with PyTorch fp32 and fails the export below its floor.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.common import ExportError
from runtime.bundle import FileEntry, LLMSection, file_entry

QUANTS = ("int4", "int8", "fp16", "fp32")
TARGETS = ("cpu", "cuda")
EXPORTERS = ("auto", "genai", "dynamo")
EXPORTER_NAMES = {"genai": "onnxruntime-genai", "dynamo": "torch-dynamo"}  # as recorded in the manifest
GENAI_ARCHS = ("llama", "mistral", "qwen2")
METHODS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-matmulnbits", "int4": "int4-matmulnbits"}
DECODER = "llm/decoder.onnx"
EMBED = "llm/embed_tokens.npy"


def check_combo(quant: str, target: str, exporter: str, arch: str) -> str:
    """Refuse what will not run; return the exporter to use."""
    if quant == "fp16" and target == "cpu":
        raise ExportError("--quant fp16 needs --target cuda (onnxruntime's CPU provider lacks fp16 kernels); "
                          "on the CPU use fp32, int8 or int4")  # fmt: skip
    if quant == "int8" and target == "cuda":
        raise ExportError(
            "--quant int8 is dynamic quantization for the CPU provider; for --target cuda use int4 or fp16"
        )
    if exporter == "genai" and arch not in GENAI_ARCHS:
        raise ExportError(f"--exporter genai does not support arch {arch!r} ({', '.join(GENAI_ARCHS)}); "
                          "use --exporter dynamo")  # fmt: skip
    if exporter == "auto":
        return "genai" if arch in GENAI_ARCHS else "dynamo"
    return exporter


def check_block_size(block_size: int) -> int:
    """MatMulNBits blocks: a power of two >= 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"--block-size {block_size}: use a power of two >= 16 (e.g. 32, 64, 128)")
    return block_size


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
    dyn = {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
           "past": tuple(({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(t.num_layers))}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=True, opset_version=18, dynamic_shapes=dyn, external_data=True,
            input_names=["inputs_embeds", "attention_mask", *kv_names(t.num_layers, "past_key_values")],
            output_names=["logits", *kv_names(t.num_layers, "present")], verbose=False,
        )  # fmt: skip


def export_genai(
    lm: Any, tokenizer: Any, path: Path, precision: str, target: str, work: Path, block_size: int
) -> None:
    """onnxruntime-genai's model builder, offline, from a local HF directory, exclude_embeds=true."""
    hf, out = work / "hf", work / "genai"
    lm.save_pretrained(hf)
    tokenizer.save(str(hf / "tokenizer.json"))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", target, "-c", str(work / "cache"),
           "--extra_options", "exclude_embeds=true", f"int4_block_size={block_size}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (res.stdout + res.stderr)[-2000:]
        raise ExportError(f"onnxruntime-genai model builder failed (exit {res.returncode}); "
                          f"retry with --exporter dynamo. Its output ends:\n{tail}")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(load_model(out / "model.onnx"), path)


def load_model(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model(model: Any, path: Path) -> None:
    """Weights in `<name>.data` beside the graph (the 2 GB protobuf limit never bites)."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)  # fmt: skip


def quantize(src: Path, dst: Path, quant: str, block_size: int, target: str) -> None:
    """Weight-only MatMulNBits (symmetric, block_size): 4 or 8 bits."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)  # the quantizers call logging.basicConfig(INFO)
    logging.disable(logging.WARNING)  # ...then log every node at INFO and advise at WARNING
    try:
        _quantize(src, dst, quant, block_size, target)
    finally:
        logging.disable(logging.NOTSET)
        root.setLevel(level)
        root.handlers[:] = handlers


def _quantize(src: Path, dst: Path, quant: str, block_size: int, target: str) -> None:
    if quant == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(load_model(src), bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=4 if target == "cpu" else None)  # fmt: skip
        q.process()
        save_model(q.model.model, dst)
    elif quant == "int8":
        # Weight-only int8 (MatMulNBits, 8 bits, symmetric blocks; activations stay float).
        # quantize_dynamic's per-tensor int8 activations lost SmolLM2 (teacher-forced top-1
        # agreement 0.54, logit errors ~10-25 from its outlier activations); this keeps 1.00.
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(load_model(src), bits=8, block_size=block_size, is_symmetric=True)
        q.process()
        save_model(q.model.model, dst)
    else:
        raise ExportError(f"no quantization step for {quant!r}")


def check_io(path: Path, layers: int) -> tuple[list[str], list[str], str]:
    """The graph's input/output names (checked against the contract) and the KV dtype."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    ins, outs = [i.name for i in g.input], [o.name for o in g.output]
    want_in = {"inputs_embeds", "attention_mask", *kv_names(layers, "past_key_values")}
    want_out = {"logits", *kv_names(layers, "present")}
    if not want_in <= set(ins) or not want_out <= set(outs):
        raise ExportError(f"decoder IO does not follow the bundle contract: inputs {ins}, outputs {outs}")
    kv = next(i for i in g.input if i.name == "past_key_values.0.key")
    kv_dtype = "float16" if kv.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"
    return ins, outs, kv_dtype


def make_decoder(
    lm: Any, cfg: Any, tokenizer: Any, final: Path, quant: str, target: str, exporter: str, block_size: int
) -> None:
    """The decoder at `final` (+ .data): exported in float, then quantized by us, except int4 for
    CUDA through the genai builder, which quantizes itself (fp16 activations, MatMulNBits)."""
    work = final.parent.parent / "llm.work"
    work.mkdir(parents=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    base = work / "base.onnx"
    builder_int4 = exporter == "genai" and quant == "int4" and target == "cuda"
    if exporter == "genai":
        precision = "int4" if builder_int4 else "fp16" if quant == "fp16" else "fp32"
        export_genai(lm, tokenizer, base, precision, target, work, block_size)
    else:
        export_dynamo(lm, cfg, base, quant == "fp16")
    if quant in ("int8", "int4") and not builder_int4:
        quantize(base, final, quant, block_size, target)
    else:
        save_model(load_model(base), final)
    shutil.rmtree(work)


def embeds_dtype(path: Path) -> str:
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inp = next(i for i in g.input if i.name == "inputs_embeds")
    return "float16" if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"


def write_llm(
    model: Any, tokenizer: Any, root: Path, quant: str, target: str, exporter: str, block_size: int
) -> tuple[LLMSection, list[FileEntry]]:
    """Export, quantize, check and hash the decoder + embedding table into bundle dir `root`."""
    from export.llm_check import quality

    cfg, lm = model.cfg, model.language_model
    exporter = check_combo(quant, target, exporter, cfg.text.arch)
    final = root / DECODER
    make_decoder(lm, cfg, tokenizer, final, quant, target, exporter, block_size)
    ins, outs, kv_dtype = check_io(final, cfg.text.num_layers)
    table = lm.get_input_embeddings().weight.detach().float().numpy()  # [vocab, hidden]
    table = table.astype(np.float16) if embeds_dtype(final) == "float16" else table  # = inputs_embeds dtype
    np.save(root / EMBED, table)
    record = quality(final, table, model, tokenizer, quant, target)
    if record.get("status") == "measured" and not record["ok"]:
        raise ExportError(f"{quant} decoder below its quality floor: top-1 {record['top1']:.3f} "
                          f"(floor {record['floor']}), greedy equal {record['greedy_equal']}; "
                          "try --quant int8, a smaller --block-size, or --exporter dynamo")  # fmt: skip
    prec = quant if quant in ("fp16", "fp32") else f"{quant} weights"
    quant_rec = {"method": METHODS[quant], "block_size": block_size if quant == "int4" else None,
                 "target": target, "agreement": record}  # fmt: skip
    section = LLMSection(
        decoder=DECODER, embed_tokens=EMBED, num_layers=cfg.text.num_layers, num_kv_heads=cfg.text.num_kv_heads,
        head_dim=cfg.text.head_dim, hidden_size=cfg.text.hidden_size, vocab_size=cfg.text.vocab_size,
        inputs=ins, outputs=outs, external_data=[DECODER + ".data"], exporter=EXPORTER_NAMES[exporter],
        has_position_ids="position_ids" in ins, kv_dtype=kv_dtype, quantization=quant_rec,
    )  # fmt: skip
    entries = [
        file_entry(root, DECODER, "llm-decoder", precision=prec, parity={"quality": record}),
        file_entry(root, DECODER + ".data", "llm-data", precision=prec),
        file_entry(
            root,
            EMBED,
            "embed",
            precision="fp16" if table.dtype == np.float16 else "fp32",
            shapes={"embed_tokens": list(table.shape)},
        ),
    ]
    quant_rec["bytes"] = sum(e.bytes for e in entries[:2])
    return section, entries


def build_parser() -> Any:
    import argparse

    from export.common import add_source_args

    p = argparse.ArgumentParser(prog="python -m export.llm", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--quant", default="int8", choices=QUANTS, help="decoder precision (default int8)")
    p.add_argument("--target", default="cpu", choices=TARGETS, help="where the decoder runs (default cpu)")
    p.add_argument(
        "--exporter", default="auto", choices=EXPORTERS, help="auto = genai builder where supported"
    )
    p.add_argument(
        "--block-size", type=int, default=32, help="int4 block size (power of 2, >= 16; default 32)"
    )
    p.add_argument(
        "--out", default="bundle", help="existing bundle (from python -m export.onnx) to add the LLM to"
    )
    p.add_argument("--force", action="store_true", help="replace the bundle's existing LLM")
    return p


def main(argv: list[str] | None = None) -> int:
    from export.build import add_llm, existing_bundle, print_summary
    from export.common import USER_ERRORS, load_source

    args = build_parser().parse_args(argv)
    try:
        check_block_size(args.block_size)
        if not existing_bundle(args.out):
            raise ExportError(
                f"{args.out} is not a bundle yet: export the vision part first "
                f"(python -m export.onnx --checkpoint CKPT --out {args.out}) or everything at once "
                f"(python -m export --checkpoint CKPT --out {args.out} --llm {args.quant})"
            )
        src = load_source(args)
        out, manifest = add_llm(
            src, args.out, args.quant, args.target, args.exporter, args.block_size, args.force
        )
    except USER_ERRORS as e:
        print(f"error: {e}")
        return 2
    print_summary(out, manifest)
    print(
        f'\nnext: python -m runtime ask --bundle {out} --image photo.jpg --question "What is in the picture?"'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
