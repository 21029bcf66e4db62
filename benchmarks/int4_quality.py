"""Which 4-bit decoder keeps quality: weight-only recipes side by side against PyTorch fp32.

    python benchmarks/int4_quality.py --checkpoint runs/demo/train/final --threads 2

One fp32 decoder is exported from the checkpoint (onnxruntime-genai's builder, as `python -m
export` does), then every recipe of --recipes quantizes it (export.quant.WeightOnly) and is
measured through the runtime's own decoder (runtime.llm.Decoder):
- teacher-forced top-1 agreement with PyTorch fp32 at every position of the fixed text set
  (export/data/agreement_text.txt, plain, plus export's gate questions in the chat template),
  and of benchmark prompts with an image at each budget (val-split scenes, the question and its
  reference answer, visual tokens from the checkpoint in PyTorch);
- decode speed: ms per token over --new tokens, recipes interleaved, medians over --reps;
- the decoder's size on disk;
- with --eval-n N, benchmark accuracy per budget on N val scenes: greedy answers of the ONNX
  decoder from the same PyTorch visual tokens (the recipe's effect alone), fp32 ONNX included.
Choose on these numbers (val split); the export's gate floor then guards the choice.
Writes benchmarks/results/int4_quality_<model>.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.gates import agreement, image_prompts, torch_refs  # noqa: E402
from export.quant import WeightOnly  # noqa: E402
from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402

# name -> (recipe or None for fp32, block size)
RECIPES: dict[str, tuple[WeightOnly | None, int]] = {
    "fp32": (None, 0),
    "int8": (WeightOnly(8), 32),
    "int4-b32": (WeightOnly(4), 32),  # `--quant int4` before this study
    "int4-asym-b32": (WeightOnly(4, symmetric=False), 32),
    "int4-b16": (WeightOnly(4), 16),
    "int4-b32-head8": (WeightOnly(4, eight_bit=("head",)), 32),
    "int4-asym-b32-head8": (WeightOnly(4, symmetric=False, eight_bit=("head",)), 32),
    "int4-asym-b16-head8": (WeightOnly(4, symmetric=False, eight_bit=("head",)), 16),
    "int4-asym-b32-head8-down8": (WeightOnly(4, symmetric=False, eight_bit=("head", "down_proj")), 32),
    "int4-asym-b32-head8-attn8": (
        WeightOnly(4, symmetric=False, eight_bit=("head", "qkv_proj", "o_proj")),
        32,
    ),
}


def base_decoder(model: Any, tok: Any, work: Path) -> Path:
    """The checkpoint's fp32 decoder (cached in work/base.onnx)."""
    from export.decoder import export_genai

    base = work / "base.onnx"
    if not base.is_file():
        export_genai(model.language_model, tok, base, "fp32", "cpu", work / "builder", 32)
    return base


def make_decoder(base: Path, name: str, work: Path, table: np.ndarray, model: Any, threads: int) -> Any:
    import onnxruntime as ort

    from export.decoder import load_model, save_model
    from runtime.bundle import LLMSection
    from runtime.llm import Decoder

    recipe, block = RECIPES[name]
    path = base
    if recipe is not None:
        path = work / f"{name}.onnx"
        if not path.is_file():
            save_model(recipe(load_model(base), block, "cpu"), path)
    t = model.cfg.text
    spec = LLMSection(decoder=path.name, embed_tokens="embed.npy", num_layers=t.num_layers,
                      num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, hidden_size=t.hidden_size,
                      vocab_size=t.vocab_size, quant=name, exporter="onnxruntime-genai")  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return Decoder(session, spec, table, t.max_position_embeddings)


def text_sequences(model: Any, tok: Any) -> dict[str, list[np.ndarray]]:
    """Token ids of the fixed text set: {"paragraphs": plain text (export/data/agreement_text.txt),
    "questions": the export gate's questions in the chat template}."""
    from export.gates import paragraphs, text_prompts

    questions = text_prompts(tok, model.cfg.template, model.cfg.bos_id)
    return {"paragraphs": paragraphs(tok), "questions": [np.asarray(i, dtype=np.int64) for i in questions]}


def decode_ms(dec: Any, new: int) -> float:
    from runtime.llm import SamplingParams

    gen = dec.start(dec.embed(list(range(100, 120))), SamplingParams(max_new_tokens=new, stop_token_ids=()))
    for _ in gen:
        pass
    return gen.decode_ms / max(1, gen.decode_steps)


def accuracy(dec: Any, model: Any, tok: Any, budgets: tuple[int, ...], n: int) -> dict[str, Any]:
    """Greedy answers of `dec` from PyTorch visual tokens on n val scenes: {budget: {cat: acc}}."""
    import torch

    from fmvr import tasks
    from fmvr.preprocess import Preprocessor
    from fmvr.tokenizer import expand_image_tokens, prompt_ids
    from runtime.llm import SamplingParams

    cfg = model.cfg
    pre = Preprocessor.from_config(cfg)
    hits: dict[int, dict[str, list[bool]]] = {t: {} for t in budgets}
    for scene in tasks.scenes("val", n, 0, "detail"):
        with torch.no_grad():
            visual = model.encode_budgets(torch.from_numpy(pre([tasks.render_scene(scene)])), budgets)
        for cat, q, a in scene.questions:
            ids = prompt_ids(tok, cfg.template, q, 1, cfg.bos_id)
            for t in budgets:
                full = expand_image_tokens(ids, cfg.image_token_id, t)
                with torch.no_grad():
                    emb = model.embed(torch.tensor([full]), visual[t]).numpy().astype(dec.embed_dtype)
                out = list(
                    dec.start(emb, SamplingParams(max_new_tokens=6, stop_token_ids=(cfg.eos_token_id,)))
                )
                hits[t].setdefault(cat, []).append(tasks.score(tok.decode(out).strip(), a))
    res: dict[str, Any] = {}
    for t in budgets:
        res[str(t)] = {c: float(np.mean(v)) for c, v in hits[t].items()}
        res[str(t)]["all"] = float(np.mean([h for v in hits[t].values() for h in v]))
    res["questions_per_budget"] = sum(len(v) for v in hits[budgets[0]].values())
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    p.add_argument("--work", type=Path, default=Path("runs/int4"), help="cache of the exported decoders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--scenes", type=int, default=4, help="val scenes of the image prompts (all their questions)"
    )
    p.add_argument("--new", type=int, default=64, help="tokens decoded per speed run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--eval-n", type=int, default=0, help="val scenes of the accuracy check (0: none)")
    p.add_argument("--eval-recipes", default="fp32,int8,int4-b32", help="recipes whose accuracy is measured")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    names = [n for n in a.recipes.split(",") if n]
    if unknown := [n for n in names if n not in RECIPES]:
        p.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")

    import torch

    from fmvr.checkpoint import load_checkpoint
    from fmvr.tokenizer import load_tokenizer

    torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint).eval()
    tok = load_tokenizer(a.checkpoint)
    budgets = tuple(t for t in model.cfg.budgets if t > 1)
    a.work.mkdir(parents=True, exist_ok=True)
    base = base_decoder(model, tok, a.work)
    table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
    text = text_sequences(model, tok)
    images = image_prompts(model, tok, budgets, a.scenes)
    lm = model.language_model
    text_ref = {k: torch_refs(lm, v) for k, v in text.items()}
    image_ref = {t: torch_refs(lm, s) for t, s in images.items()}

    decoders, rows = {}, {}
    for name in names:
        t0 = time.time()
        dec = decoders[name] = make_decoder(base, name, a.work, table, model, a.threads)
        path = a.work / (dec.spec.decoder)
        size = sum(f.stat().st_size for f in a.work.glob(path.name + "*"))
        recipe, block = RECIPES[name]
        rows[name] = {
            "recipe": recipe.describe() if recipe else "fp32 (no quantization)",
            "block_size": block or None,
            "decoder_mb": size / 2**20,
            "text": {k: agreement(dec, v, text_ref[k]) for k, v in text.items()},
            "image": {str(t): agreement(dec, images[t], image_ref[t]) for t in budgets},
            "build_s": time.time() - t0,
        }
        img = rows[name]["image"]
        rows[name]["image_min_top1"] = min(v["top1"] for v in img.values())
        print(f"{name}: text top-1 {rows[name]['text']['paragraphs']['top1']:.3f}, image min {rows[name]['image_min_top1']:.3f}, "
              f"{size / 2**20:.0f} MB", flush=True)  # fmt: skip
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.reps):  # interleaved: every recipe sees the same machine state
        for n in names:
            times[n].append(decode_ms(decoders[n], a.new))
    for n in names:
        rows[n]["decode_ms_per_token"] = statistics.median(times[n])
        rows[n]["decode_tok_s"] = 1000 / rows[n]["decode_ms_per_token"]
        rows[n]["decode_ms_all"] = times[n]
    if a.eval_n:
        for n in [n for n in a.eval_recipes.split(",") if n in decoders]:
            rows[n]["accuracy_val"] = accuracy(decoders[n], model, tok, budgets, a.eval_n)
            print(f"{n}: accuracy {rows[n]['accuracy_val']}", flush=True)

    tag = model.cfg.name
    rec = {**run_record(), "checkpoint": str(a.checkpoint), "threads": a.threads, "budgets": list(budgets),
           "scenes": a.scenes, "new_tokens": a.new, "reps": a.reps, "eval_n": a.eval_n, "recipes": rows}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"int4_quality_{tag}.json", rec)
    write_text(a.out / f"int4_quality_{tag}.md", markdown(rec))
    print(markdown(rec))
    return 0


def markdown(rec: dict[str, Any]) -> str:
    budgets = rec["budgets"]
    head = "| recipe | block | MB | paragraphs top-1 | paragraphs KL | questions top-1 | " + " | ".join(
        f"image top-1 @{t}" for t in budgets
    )
    lines = [
        "# Decoder quantization recipes against PyTorch fp32",
        "",
        f"`{rec['command']}` (commit {rec['code']['commit'][:12]}{' dirty' if rec['code']['dirty'] else ''}); "
        f"{rec['threads']} threads, checkpoint `{rec['checkpoint']}`.",
        "Top-1: teacher-forced agreement with PyTorch fp32 at every position (text: "
        f"export/data/agreement_text.txt + the gate's questions; image: the text after the image, {rec['scenes']} val scenes' "
        "questions with their answers). Decode: median ms per token over "
        f"{rec['new_tokens']} tokens, {rec['reps']} interleaved runs.",
        "",
        head + " | decode ms/token | tok/s |",
        "|" + "---|" * (8 + len(budgets)),
    ]
    for name, r in rec["recipes"].items():
        img = " | ".join(f"{r['image'][str(t)]['top1']:.3f}" for t in budgets)
        lines.append(
            f"| {name} | {r['block_size'] or '-'} | {r['decoder_mb']:.0f} | {r['text']['paragraphs']['top1']:.3f} | "
            f"{r['text']['paragraphs']['kl']:.4f} | "
            f"{r['text']['questions']['top1']:.3f} | {img} | "
            f"{r['decode_ms_per_token']:.2f} | {r['decode_tok_s']:.0f} |"
        )
    acc = {n: r["accuracy_val"] for n, r in rec["recipes"].items() if "accuracy_val" in r}
    if acc:
        first = next(iter(acc.values()))
        lines += ["", f"Accuracy (all categories, val split, {first['questions_per_budget']} questions per budget):", "",
                  "| recipe | " + " | ".join(str(t) for t in budgets) + " |", "|" + "---|" * (1 + len(budgets))]  # fmt: skip
        for n, r in acc.items():
            lines.append(f"| {n} | " + " | ".join(f"{100 * r[str(t)]['all']:.1f}" for t in budgets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
