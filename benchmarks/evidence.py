"""Evidence a reviewer would accept: FMVR against M3 from one shared start, on the built-in benchmark.

    # choose steps and learning rates on the val split ...
    python benchmarks/evidence.py --variant detail --split val --eval-n 60
    # ... then report once on the test split's own benchmark seed (used for nothing else)
    python benchmarks/evidence.py --variant detail --split test --eval-n 200 --seeds 0,1,2

The paper's setting: one starting model trained at the full grid (the `none` cascade, plain LLaVA:
stage ground at 576 tokens, then stage 2 at 576), then a Matryoshka adaptation at 144/36/9 tokens
in which the arms differ only in the cascade swapped in (FMVR's restoration blocks, with their own
learning rate --pyramid-lr, or M3's plain pooling) and, per arm, the LM frozen (only the projector
and the blocks can restore what pooling loses) or trained through LoRA.

Protocol: train, val and test scenes come from disjoint scene seeds (fmvr.tasks.scene_seed); the
test split is scored on --test-seed, a benchmark seed nothing else uses; accuracy intervals and
FMVR - M3 are bootstrapped over scenes (paired: the same scenes under both arms, each scene's
score averaged over the seeds); the constant baseline is fit on the training split. Every run
keeps its code version (fmvr.provenance); a cached run is reused only when its source hash
matches this code's, and the summary refuses runs of mixed code versions. Writes
<out>/<name>.{json,md,png}; the JSON's `rows` hold (arm, pyramid, lm, seed, tokens, category,
accuracy, n).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmvr import atomic, tasks  # noqa: E402
from fmvr.provenance import code_version, run_record, source_sha256  # noqa: E402

ARMS = {  # name -> (cascade, how the LM trains)
    "fmvr-frozen": ("fmvr", "frozen"),
    "m3-frozen": ("m3", "frozen"),
    "fmvr-lora": ("fmvr", "lora"),
    "m3-lora": ("m3", "lora"),
}
CEILING = "none"  # the shared start, scored at 576 tokens
RUN_SOURCES = ("fmvr", "train", "benchmarks/evidence.py")  # what a cached run depends on


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="small", choices=("tiny", "small"), help="model preset")
    a("--variant", default="detail", choices=tasks.VARIANTS, help="built-in benchmark variant")
    a("--arms", default=",".join(ARMS), help=f"adaptation arms, comma-separated ({', '.join(ARMS)})")
    a("--seeds", default="0,1,2", help="adaptation seeds (init of the swapped-in blocks, data order)")
    a("--start-seed", type=int, default=0, help="seed of the one shared starting model")
    a("--bench-n", type=int, default=600, help="training scenes of every stage")
    a("--start-ground-steps", type=int, default=250, help="start: stage ground at 576 tokens (no LM)")
    a("--ground-batch-size", type=int, default=32, help="images per stage-ground step")
    a("--start-steps", type=int, default=80, help="start: stage 2 at 576 tokens, LoRA")
    a("--adapt-steps", type=int, default=80, help="adaptation steps at --adapt-tokens")
    a("--adapt-tokens", default="144,36,9", help="budgets the adaptation draws from (one per step)")
    a("--batch-size", type=int, default=8, help="scenes per stage-2 / adaptation step")
    a(
        "--bench-questions",
        type=int,
        default=5,
        help="question blocks per scene (0: all 14; 5: one per category)",
    )
    a("--lora-lr", type=float, default=5e-4, help="LoRA learning rate (start and the lora arms)")
    a(
        "--projector-lr",
        type=float,
        default=1e-5,
        help="projector learning rate in the lora arms and the start",
    )
    a("--frozen-projector-lr", type=float, default=1e-4, help="projector learning rate in the frozen-LM arms")
    a("--pyramid-lr", type=float, default=1e-3, help="the FMVR blocks' own learning rate (0: frozen blocks)")
    a("--split", default="val", choices=("val", "test"), help="val: for choosing; test: for reporting")
    a("--test-seed", type=int, default=7, help="benchmark seed of the test scenes (used for nothing else)")
    a("--eval-n", type=int, default=60, help="scenes scored (5 questions each)")
    a("--boot", type=int, default=10_000, help="bootstrap resamples")
    a(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: if the CPU has AMX)",
    )
    a("--threads", type=int, default=2, help="torch CPU threads")
    a("--runs", default="runs/evidence", help="cached runs (<runs>/<preset>-<variant>/...)")
    a("--finished-only", action="store_true", help="train and score nothing: summarise what is cached")
    a("--device-tag", default="cpu", help="where it ran (cpu, gpu), recorded in the results")
    a("--out", default="benchmarks/results", help="summary folder")
    a("--name", default="", help="summary name (default evidence_<preset>_<variant>_<split>)")
    return p


def has_bf16() -> bool:
    try:
        return any(f in Path("/proc/cpuinfo").read_text() for f in ("amx_bf16", "avx512_bf16"))
    except OSError:
        return False


# ---- cached runs ------------------------------------------------------------------------------


def run_code() -> str:
    return source_sha256(RUN_SOURCES)


def cached(path: Path) -> dict | None:
    """A finished evaluation's record when this code made it (RUN_SOURCES' hash), else None."""
    rec = path / "result.json"
    if not rec.is_file():
        return None
    d = json.loads(rec.read_text())
    return d if d.get("run_source_sha256") == run_code() else None


def trained(out: Path, cfg, run) -> Path:
    """out/final, trained by `run(cfg)` unless a finished run of the same config AND this code is
    there (out/code.json); a run of other code is moved aside, never reused."""
    from train.ckpt import same_run

    stamp = out / "code.json"
    if (
        same_run(out / "final", cfg)
        and stamp.is_file()
        and json.loads(stamp.read_text())["run_source_sha256"] == run_code()
    ):
        return out / "final"
    if out.exists():
        aside = out.with_name(f"{out.name}.stale-{int(time.time())}")
        out.rename(aside)
        print(f"{out} was made by other code or another config: moved to {aside}, training again", flush=True)
    run(cfg)
    atomic.write_json(stamp, {"run_source_sha256": run_code(), **run_record()})
    return out / "final"


def train_cfg(args, out: Path, **kw):
    from train.stages import TrainConfig

    base = dict(
        out=str(out), preset=args.preset, bench_variant=args.variant, bench_n=args.bench_n, bf16=args.bf16,
        bench_questions=args.bench_questions, progress=False, log_every=10, cache_vision=True,
    )  # fmt: skip
    return TrainConfig(**(base | kw)).check()


def start_model(args) -> Path:
    """The shared plain-LLaVA start (none cascade): ground at 576, then stage 2 (LoRA) at 576."""
    from train.ground import train as train_ground
    from train.loop import train

    root = Path(args.runs) / f"{args.preset}-{args.variant}" / f"start-s{args.start_seed}"
    ground = train_cfg(args, root / "ground", stage="ground", pyramid="none", tokens="576", steps=args.start_ground_steps,
                       batch_size=args.ground_batch_size, lr=1e-3, budget_mode="mean", seed=args.start_seed, cache_vision=False)  # fmt: skip
    trained(root / "ground", ground, train_ground)
    s2 = train_cfg(args, root / "stage2", stage="stage2", init=str(root / "ground" / "final"), tokens="576",
                   steps=args.start_steps, batch_size=args.batch_size, bench_seed=1, bench_kind="qa", lora=True,
                   lora_alpha=128, lr=args.lora_lr, projector_lr=args.projector_lr, schedule="constant",
                   seed=args.start_seed)  # fmt: skip
    return trained(root / "stage2", s2, train)


def adapt(args, arm: str, seed: int, start: Path) -> Path:
    """One arm: the start with `arm`'s cascade swapped in, trained at --adapt-tokens."""
    from train.loop import train

    pyramid, lm = ARMS[arm]
    out = arm_dir(args, arm, seed)
    common = dict(init=str(start), pyramid=pyramid, pyramid_init="pooling", tokens=args.adapt_tokens,
                  budget_mode="random", steps=args.adapt_steps, batch_size=args.batch_size, bench_seed=2,
                  bench_kind="qa", schedule="constant", seed=seed,
                  pyramid_lr=args.pyramid_lr if pyramid == "fmvr" else -1.0)  # fmt: skip
    if lm == "lora":
        cfg = train_cfg(args, out, stage="stage2", lora=True, lora_alpha=128, lr=args.lora_lr,
                        projector_lr=args.projector_lr, **common)  # fmt: skip
    else:  # projector and blocks only, on the questions in the chat template: stage 1's parts
        cfg = train_cfg(args, out, stage="stage1", template="chat", lr=args.frozen_projector_lr, **common)
    return trained(out, cfg, train)


def arm_dir(args, arm: str, seed: int) -> Path:
    """An arm's run folder; FMVR's carries the blocks' learning rate, so a val sweep over
    --pyramid-lr keeps every candidate (M3 has no blocks: one run serves every candidate)."""
    lr = f"-plr{args.pyramid_lr:g}" if ARMS[arm][0] == "fmvr" else ""
    return Path(args.runs) / f"{args.preset}-{args.variant}" / f"{arm}{lr}-s{seed}"


def scored(args, name: str, ckpt: Path, budgets: tuple[int, ...]) -> dict:
    """The run's answers on the evaluated scenes (cached per split, seed, n and code version)."""
    from fmvr.checkpoint import load_checkpoint
    from fmvr.tokenizer import load_tokenizer
    from train.eval import evaluate_bench

    split_seed = args.test_seed if args.split == "test" else 0
    where = ckpt.parent / f"eval-{args.split}-b{split_seed}-n{args.eval_n}"
    if (hit := cached(where)) is not None:
        return hit
    if args.finished_only:
        return {}
    t0 = time.time()
    model = load_checkpoint(ckpt).eval()
    res = evaluate_bench(model, load_tokenizer(ckpt), budgets, args.eval_n, args.split, split_seed,
                         variant=args.variant)  # fmt: skip
    rec = {**run_record(), "run_source_sha256": run_code(), "run": name, "eval_s": time.time() - t0, "samples": res["samples"],
           "accuracy": {str(t): v for t, v in res["accuracy"].items()}}  # fmt: skip
    atomic.write_json(where / "result.json", rec)
    return rec


# ---- summary ----------------------------------------------------------------------------------


def per_scene(samples: list[dict], tokens: int, cats: tuple[str, ...]) -> dict[int, list[bool]]:
    """{scene seed: [hit per question]} at one budget."""
    out: dict[int, list[bool]] = {}
    for s in samples:
        if s["budget"] == tokens and s["category"] in cats:
            out.setdefault(s["scene"], []).append(tasks.score(s["output"], s["answer"]))
    return out


def arm_scores(runs: list[dict], tokens: int, cats: tuple[str, ...]) -> dict[int, float]:
    """{scene: fraction right, averaged over the arm's seeds} at one budget."""
    by_seed = [per_scene(r["samples"], tokens, cats) for r in runs]
    scenes = sorted(set.intersection(*(set(s) for s in by_seed)))
    return {k: float(np.mean([np.mean(s[k]) for s in by_seed])) for k in scenes}


def summarise(args, results: dict[str, list[dict]]) -> dict:
    cats = tasks.categories(args.variant)
    rows, accuracy, differences = [], [], []
    for arm, runs in results.items():
        pyramid, lm = ARMS.get(arm, (CEILING, "lora"))
        for r in runs:
            for t, accs in r["accuracy"].items():
                for c, v in accs.items():
                    n = args.eval_n * (len(cats) if c == "all" else 1)
                    rows.append({"arm": arm, "pyramid": pyramid, "lm": lm, "seed": r["seed"], "tokens": int(t),
                                 "category": c, "accuracy": v, "n": n})  # fmt: skip
        for t in sorted({int(t) for r in runs for t in r["accuracy"]}, reverse=True):
            for c in (*cats, "all"):
                got = arm_scores(runs, t, cats if c == "all" else (c,))
                m, lo, hi = tasks.paired_bootstrap(list(got.values()), n_boot=args.boot)
                accuracy.append({"arm": arm, "tokens": t, "category": c, "accuracy": m, "low": lo, "high": hi,
                                 "seeds": len(runs), "scenes": len(got)})  # fmt: skip
    for lm in ("frozen", "lora"):
        a, b = results.get(f"fmvr-{lm}"), results.get(f"m3-{lm}")
        if not a or not b:
            continue
        for t in sorted({int(t) for r in a for t in r["accuracy"]}, reverse=True):
            fa, fb = arm_scores(a, t, cats), arm_scores(b, t, cats)
            common = sorted(set(fa) & set(fb))
            d, lo, hi = tasks.paired_bootstrap(
                [fa[k] for k in common], [fb[k] for k in common], n_boot=args.boot
            )
            differences.append({"lm": lm, "tokens": t, "fmvr_minus_m3": d, "low": lo, "high": hi,
                                "scenes": len(common)})  # fmt: skip
    return {"rows": rows, "accuracy": accuracy, "differences": differences}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(args, summary: dict, base: dict, code: dict) -> str:
    cats = (*tasks.categories(args.variant), "all")
    acc = {(r["arm"], r["tokens"], r["category"]): r for r in summary["accuracy"]}
    arms = list(dict.fromkeys(r["arm"] for r in summary["accuracy"]))
    lines = [
        f"# Evidence: FMVR vs M3 from one plain-LLaVA start ({args.preset}, {args.variant} variant, "
        f"{args.split} split, {args.device_tag})",
        "",
        f"Command: `{run_record()['command']}`; code {code['commit']} (source sha256 "
        f"{code['source_sha256'][:12]}, dirty: {code['dirty']}): every run below was made by this code.",
        "",
        f"Accuracy (%) on {args.eval_n} {args.split} scenes x {len(cats) - 1} questions "
        f"(benchmark seed {args.test_seed if args.split == 'test' else 0}), mean over the seeds, with a 95 % "
        "bootstrap interval over scenes. Start: stage ground "
        f"({args.start_ground_steps} steps) and stage 2 ({args.start_steps} LoRA steps) at 576 tokens, `none` "
        f"cascade; arms: {args.adapt_steps} steps at {args.adapt_tokens} tokens.",
        "",
        "| arm | seeds | tokens | " + " | ".join(cats) + " |",
        "|---|---|---|" + "---|" * len(cats),
        "| constant answer (fit on train) | - | - | " + " | ".join(pct(base[c][1]) for c in cats) + " |",
    ]
    for arm in arms:
        for t in sorted({k[1] for k in acc if k[0] == arm}, reverse=True):
            cells = [acc[(arm, t, c)] for c in cats]
            lines.append(f"| {arm} | {cells[0]['seeds']} | {t} | " + " | ".join(
                f"{pct(r['accuracy'])} [{pct(r['low'])}, {pct(r['high'])}]" for r in cells) + " |")  # fmt: skip
    if summary["differences"]:
        lines += ["", "FMVR - M3, all categories, paired over the same scenes (points, 95 % interval):", "",
                  "| LM | tokens | FMVR - M3 | interval | scenes |", "|---|---|---|---|---|"]  # fmt: skip
        for d in summary["differences"]:
            lines.append(f"| {d['lm']} | {d['tokens']} | {pct(d['fmvr_minus_m3'])} | "
                         f"[{pct(d['low'])}, {pct(d['high'])}] | {d['scenes']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in summary["accuracy"]):
        pts = sorted(
            (r["tokens"], r) for r in summary["accuracy"] if r["arm"] == arm and r["category"] == "all"
        )
        x = [t for t, _ in pts]
        y = np.array([100 * r["accuracy"] for _, r in pts])
        err = np.array(
            [[100 * (r["accuracy"] - r["low"]), 100 * (r["high"] - r["accuracy"])] for _, r in pts]
        ).T
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks([1, 9, 36, 144, 576], ["1", "9", "36", "144", "576"])
    ax.set(xlabel="visual tokens", ylabel="accuracy, all categories (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.bf16 = has_bf16() if args.bf16 is None else args.bf16
    args.name = args.name or f"evidence_{args.preset}_{args.variant}_{args.split}"
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    start = (
        Path(args.runs) / f"{args.preset}-{args.variant}" / f"start-s{args.start_seed}" / "stage2" / "final"
    )
    if not args.finished_only:
        start = start_model(args)
    results: dict[str, list[dict]] = {}
    if start.is_dir():
        rec = scored(args, CEILING, start, (576,))
        results[CEILING] = [rec | {"seed": args.start_seed}] if rec else []
    for seed in map(int, args.seeds.split(",")):  # seed-major: an interrupted study holds every arm
        for arm in args.arms.split(","):
            ckpt = arm_dir(args, arm, seed) / "final"
            if not args.finished_only:
                ckpt = adapt(args, arm, seed, start)
            rec = scored(args, arm, ckpt, (576, 144, 36, 9, 1)) if ckpt.is_dir() else {}
            if rec:
                results.setdefault(arm, []).append(rec | {"seed": seed})
                print(
                    f"{arm} seed {seed}: "
                    + ", ".join(f"{t}: {pct(v['all'])}" for t, v in rec["accuracy"].items())
                )
    results = {k: v for k, v in results.items() if v}
    if not results:
        raise SystemExit(f"no run of this code version under {args.runs}: train first (drop --finished-only)")
    split_seed = args.test_seed if args.split == "test" else 0
    base = tasks.constant_baseline(args.split, args.eval_n, split_seed, variant=args.variant)
    summary = summarise(args, results)
    code = code_version()
    out = Path(args.out)
    atomic.write_json(out / f"{args.name}.json", {
        **run_record(), "args": vars(args), "device": args.device_tag, "variant": args.variant, "split": args.split,
        "bench_seed": split_seed, **summary,
        "constant_baseline": {c: {"answer": a, "accuracy": v} for c, (a, v) in base.items()},
        "runs": [{k: v for k, v in r.items() if k != "samples"} for rs in results.values() for r in rs],
    }, indent=1)  # fmt: skip
    md = markdown(args, summary, base, code)
    atomic.write_text(out / f"{args.name}.md", md)
    plot(summary, out / f"{args.name}.png")
    print(md)
    print(f"wrote {out / args.name}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
