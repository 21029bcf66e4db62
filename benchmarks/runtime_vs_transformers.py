"""Our torch-free runtime vs transformers' `generate` on the same tiny model, image and prompt.

fp32 first, then int8 (the bundle's int8 decoder vs torch dynamic int8 Linear layers), measured
side by side in one run, interleaved: end-to-end latency (JPEG bytes -> N answer tokens:
preprocess, vision, prefill, decode) and decode tokens/s. Both sides decode exactly N tokens
(end-of-sequence ignored) with the same thread count. This script imports torch; the runtime
it measures does not.

    python benchmarks/runtime_vs_transformers.py [--tokens 576 36] [--new-tokens 32] [--threads 2]

Writes benchmarks/results/runtime_vs_transformers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import open_atomic, write_json, write_text  # noqa: E402 (after the path line)

PROMPT = "What is in the picture? Answer the question using a single word or phrase."


def photo_bytes() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def torch_model(quant: str):
    import torch

    from fmvr.config import preset
    from fmvr.model import build_model

    model = build_model(preset("tiny"), seed=0)  # the weights export.build_tiny_bundle uses
    if quant == "int8":
        model.language_model = torch.ao.quantization.quantize_dynamic(
            model.language_model, {torch.nn.Linear}, dtype=torch.qint8
        )
    return model.eval()


def hf_answer(model, pipe, image: bytes, tokens: int, new: int) -> tuple[list[int], dict[str, float]]:
    """fmvr preprocessing + the PyTorch vision path + transformers generate (greedy, exactly `new` tokens)."""
    import torch

    from fmvr.tokenizer import expand_image_tokens

    t0 = time.perf_counter()
    with torch.no_grad():
        pixels = torch.from_numpy(pipe.preprocess(image))  # [1, 3, S, S]
        ids = torch.tensor([expand_image_tokens(pipe.prompt_ids(PROMPT), pipe.special["image"], tokens)])
        embeds = model.embed(ids, model.encode_image(pixels, tokens))  # [1, S, D]
        t1 = time.perf_counter()
        out = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pipe.special["pad"],
        )
    t2 = time.perf_counter()
    return out[0].tolist()[-new:], {"encode_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3}


def rt_answer(pipe, image: bytes, tokens: int, new: int) -> tuple[list[int], dict[str, float]]:
    from runtime.llm import SamplingParams

    t0 = time.perf_counter()
    vp = pipe.encode(image, [tokens])
    embeds = pipe.embeddings(pipe.prompt_ids(PROMPT), vp.features[tokens])  # [1, S, D]
    t1 = time.perf_counter()
    gen = pipe.decoder.start(embeds, SamplingParams(max_new_tokens=new))  # no stop tokens: exactly `new`
    ids = list(gen)
    t2 = time.perf_counter()
    return ids, {"encode_ms": (t1 - t0) * 1e3, "generate_ms": (t2 - t1) * 1e3}


def measure(pipe, model, image: bytes, tokens: int, new: int, runs: int) -> dict[str, dict[str, float]]:
    """Interleaved runs; decode tokens/s from the difference between `new` and 1 generated token."""
    samples: dict[str, dict[str, list[float]]] = {
        k: {"e2e": [], "gen1": [], "genN": []} for k in ("runtime", "hf")
    }
    for i in range(runs + 1):  # the first round warms up
        sides = (
            ("runtime", lambda n: rt_answer(pipe, image, tokens, n)),
            ("hf", lambda n: hf_answer(model, pipe, image, tokens, n)),
        )
        for name, fn in sides:
            _, one = fn(1)
            _, full = fn(new)
            if i:
                samples[name]["gen1"].append(one["generate_ms"])
                samples[name]["genN"].append(full["generate_ms"])
                samples[name]["e2e"].append(full["encode_ms"] + full["generate_ms"])
    out = {}
    for name, s in samples.items():
        gen1, genn = statistics.median(s["gen1"]), statistics.median(s["genN"])
        out[name] = {
            "e2e_ms": statistics.median(s["e2e"]),
            "prefill_ms": gen1,
            "decode_tok_s": (new - 1) / max((genn - gen1) / 1e3, 1e-9),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=[576, 36], help="visual-token budgets to compare at"
    )
    ap.add_argument("--new-tokens", type=int, default=32, help="answer tokens decoded by both sides")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for both onnxruntime and torch (1: on a shared/loaded machine torch's OpenMP spin-waits collapse with 2)",
    )
    ap.add_argument(
        "--quant", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"], help="precisions"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    args = ap.parse_args(argv)

    import torch

    from export import build_tiny_bundle
    from runtime.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    image = photo_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            bundle = build_tiny_bundle(Path(tmp) / quant, quant=quant)
            pipe = Pipeline.load(bundle, threads=args.threads, warmup=True)
            model = torch_model(quant)
            for t in args.tokens:
                same = (
                    rt_answer(pipe, image, t, args.new_tokens)[0]
                    == hf_answer(model, pipe, image, t, args.new_tokens)[0]
                )
                res = measure(pipe, model, image, t, args.new_tokens, args.runs)
                cells = {f"{k}_{m}": v for k, d in res.items() for m, v in d.items()}
                rows.append({"quant": quant, "tokens": t, "same_tokens": same, **cells})
                print(rows[-1], flush=True)
    report = {
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "runs": args.runs,
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    write_json(out / "runtime_vs_transformers.json", report)
    md = to_markdown(report)
    write_text(out / "runtime_vs_transformers.md", md)
    plot(report, out / "runtime_vs_transformers.png")
    print(md)
    print(f"wrote {out}/runtime_vs_transformers.{{json,md,png}}")
    print("next: python -m runtime latency --bundle BUNDLE")
    return 0


def to_markdown(rep: dict) -> str:
    lines = [
        f"# Runtime (onnxruntime, no torch) vs transformers generate: tiny model, {rep['new_tokens']} "
        f"answer tokens, {rep['threads']} threads, median of {rep['runs']}",
        "",
        "| LLM | visual tokens | same greedy tokens | runtime e2e ms | transformers e2e ms | speed-up "
        "| runtime decode tok/s | transformers decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        lines.append(
            f"| {r['quant']} | {r['tokens']} | {r['same_tokens']} | {r['runtime_e2e_ms']:.1f} | {r['hf_e2e_ms']:.1f} "
            f"| {r['hf_e2e_ms'] / r['runtime_e2e_ms']:.2f}x | {r['runtime_decode_tok_s']:.0f} | {r['hf_decode_tok_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["rows"]
    labels = [f"{r['quant']}\n{r['tokens']} tok" for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(x - 0.2, [r["runtime_e2e_ms"] for r in rows], 0.4, label="runtime (onnxruntime)")
    a.bar(x + 0.2, [r["hf_e2e_ms"] for r in rows], 0.4, label="transformers generate")
    a.set_xticks(x, labels)
    a.set_ylabel(f"end-to-end ms ({rep['new_tokens']} tokens)")
    a.legend(fontsize=8)
    b.bar(x - 0.2, [r["runtime_decode_tok_s"] for r in rows], 0.4, label="runtime")
    b.bar(x + 0.2, [r["hf_decode_tok_s"] for r in rows], 0.4, label="transformers")
    b.set_xticks(x, labels)
    b.set_ylabel("decode tokens/s")
    b.legend(fontsize=8)
    fig.tight_layout()
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
