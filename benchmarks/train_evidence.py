"""Evidence: train a preset with the fmvr, m3 and none cascades (same data, steps, seeds,
recipe) on the built-in benchmark and score accuracy per budget and category on its test split.

    python benchmarks/train_evidence.py                  # tiny: the committed train_evidence.*
    python benchmarks/train_evidence.py --preset small   # small: evidence_small.* (recipe flags below;
                                                         # superseded by benchmarks/evidence.py)

Each run's result is kept under --runs (a rerun skips finished runs); the summary goes to
benchmarks/results/<name>.{json,md,png}. The JSON holds `rows`: one object per (pyramid,
seed, tokens, category) with the accuracy (0..1) and n (questions scored).
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

from fmvr.cli import parse_tokens  # noqa: E402
from fmvr.config import preset  # noqa: E402
from fmvr.tasks import CATEGORIES, CLIP_CATEGORY, constant_baseline  # noqa: E402
from train.ckpt import same_run  # noqa: E402
from train.eval import evaluate_bench  # noqa: E402
from train.ground import train_ground  # noqa: E402
from train.loop import train_model  # noqa: E402
from train.stages import TrainConfig  # noqa: E402

TOWERS = {
    "tiny": "frozen random tiny CLIP tower; projector, pyramid and LLM trained",
    "small": "frozen pretrained EfficientNet-Lite0; projector, pyramid and SmolLM2-135M (LoRA if --lora) trained",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="model preset")
    p.add_argument("--lora", action="store_true", help="train the LLM through LoRA adapters (small)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or a CPU with bf16 matrix units)")
    p.add_argument("--projector-lr", type=float, default=0.0, help="lr of projector + pyramid (0: --lr)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (scale alpha / r)")
    p.add_argument(
        "--stage1-steps", type=int, default=0, help="stage-1 caption steps first (0: stage 2 only)"
    )
    p.add_argument(
        "--ground-steps",
        type=int,
        default=0,
        help="stage ground first (visual tokens regressed onto word grids from the scenes' boxes; train/ground.py)",
    )
    p.add_argument(
        "--ground-tokens",
        default="",
        help="budgets stage ground regresses (default: --tokens; the demo: 36,9 under a stage 2 at 144,36,9)",
    )
    p.add_argument("--ground-batch-size", type=int, default=32, help="stage-ground images per step")
    p.add_argument("--ground-lr", type=float, default=1e-3, help="stage-ground learning rate")
    p.add_argument("--stage1-batch-size", type=int, default=8, help="stage-1 captions per step")
    p.add_argument("--stage1-lr", type=float, default=1e-3, help="stage-1 learning rate")
    p.add_argument("--stage1-bench-n", type=int, default=0, help="stage-1 caption scenes (0: --bench-n)")
    p.add_argument(
        "--stage1-template",
        default="plain",
        choices=("plain", "chat"),
        help="stage-1 template (chat: the model's own; for small, plain does not carry over to ChatML)",
    )
    p.add_argument(
        "--kind",
        default="qa",
        choices=("qa", "mix"),
        help="stage-2 records: qa (every question) or mix (questions + the caption as one more block)",
    )
    p.add_argument(
        "--tokens",
        default="all",
        help="budgets trained and scored, comma-separated (all: the model's; e.g. 36,9 keeps CPU steps cheap)",
    )
    p.add_argument(
        "--eval-tokens",
        default="",
        help="budgets scored (default: the trained --tokens; all: every budget of the cascade)",
    )
    p.add_argument(
        "--clips",
        type=int,
        default=0,
        help="two-frame clips trained in stage 2 beside the scenes, and --eval-n clips scored (the frames category)",
    )
    p.add_argument("--device-tag", default="cpu", help="where it ran, recorded in the results (cpu, gpu)")
    p.add_argument("--pyramids", default="fmvr,m3,none", help="cascades to compare")
    p.add_argument("--seeds", default="0,1,2", help="seeds (model init and data order)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=6, help="samples (~20-question conversations) per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (3%% warmup, then --schedule)")
    p.add_argument(
        "--schedule",
        default="constant",
        choices=("cosine", "constant"),
        help="lr after warmup (constant: short runs)",
    )
    p.add_argument("--budget-mode", default="random", choices=("mean", "random"), help="Matryoshka loss mode")
    p.add_argument("--bench-n", type=int, default=1500, help="training scenes")
    p.add_argument("--eval-n", type=int, default=50, help="test scenes (5 questions each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--runs", default="runs/evidence", help="where each run's checkpoint and result go")
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: summarise the runs of --pyramids/--seeds already finished under --runs",
    )
    p.add_argument("--out", default="benchmarks/results", help="summary folder")
    p.add_argument(
        "--name", default="", help="summary file name (default: train_evidence / evidence_<preset>)"
    )
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    args.name = args.name or ("train_evidence" if args.preset == "tiny" else f"evidence_{args.preset}")
    return args


def run_one(args, pyramid: str, seed: int, cache) -> dict:
    out = Path(args.runs) / f"{pyramid}-s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    common = dict(
        preset=args.preset,
        pyramid=pyramid,
        bf16=args.bf16,
        seed=seed,
        budget_mode=args.budget_mode,
        tokens=run_tokens(args, pyramid),
        cache_vision=True,  # the tower is frozen: its features are computed once per image
        progress=False,
        log_every=10,
    )
    t0 = time.time()
    init = ""
    if args.ground_steps and args.stage1_steps:
        raise ValueError("--ground-steps and --stage1-steps are alternative first stages: pass one")
    if args.ground_steps:
        g = TrainConfig(
            stage="ground",
            out=str(out / "ground"),
            steps=args.ground_steps,
            batch_size=args.ground_batch_size,
            lr=args.ground_lr,
            bench_n=args.bench_n,
            # every budget's word grid each step: no LM, cheap
            **(
                common
                | {"budget_mode": "mean", "tokens": run_tokens(args, pyramid, args.ground_tokens or None)}
            ),
        ).check()
        if not same_run(out / "ground" / "final", g):
            train_ground(g)
        init = str(out / "ground" / "final")
    if args.stage1_steps:
        s1 = TrainConfig(
            stage="stage1",
            out=str(out / "stage1"),
            steps=args.stage1_steps,
            batch_size=args.stage1_batch_size,
            lr=args.stage1_lr,
            template=args.stage1_template,
            bench_n=args.stage1_bench_n or args.bench_n,
            **common,
        ).check()
        if not same_run(out / "stage1" / "final", s1):  # a finished stage 1 of this recipe is kept
            train_model(s1, cache=cache)
        init = str(out / "stage1" / "final")
    cfg = TrainConfig(
        stage="stage2",
        out=str(out),
        init=init,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        projector_lr=args.projector_lr,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        bench_n=args.bench_n,
        bench_seed=1 if init else 0,  # stage 2 sees other scenes than the first stage's
        bench_kind=args.kind,
        bench_clips=args.clips,
        **common,
    ).check()
    model, _ = train_model(cfg, cache=cache)  # one frozen tower (tower_seed 0 / pretrained) for all runs
    train_s = time.time() - t0
    from fmvr.tokenizer import preset_tokenizer

    budgets = parse_tokens(run_tokens(args, pyramid, args.eval_tokens or cfg.tokens), model.cfg.budgets)
    clips = scored_clips(args)
    res = evaluate_bench(
        model, preset_tokenizer(model.cfg), budgets, n=args.eval_n, split="test", clips=clips
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    row = {
        "pyramid": pyramid,
        "seed": seed,
        "train_s": train_s,
        "eval_s": time.time() - t0 - train_s,
        "accuracy": {str(t): v for t, v in res["accuracy"].items()},
        "n": {c: args.eval_n for c in CATEGORIES}
        | {"all": args.eval_n * len(CATEGORIES)}
        | ({CLIP_CATEGORY: clips} if clips else {}),
        "final_loss": log[-1]["loss"],
        "config": cfg.to_dict(),
    }
    done.write_text(json.dumps(row, indent=1) + "\n")
    print(
        f"{pyramid} seed {seed}: train {train_s:.0f}s, accuracy "
        + ", ".join(f"{t}:{100 * v['all']:.1f}" for t, v in res["accuracy"].items()),
        flush=True,
    )
    return row


def run_tokens(args, pyramid: str, tokens: str | None = None) -> str:
    """The budgets one cascade trains (or is scored at): `tokens` (default --tokens) where the
    cascade has them all, else its own (the `none` cascade, plain LLaVA, has only the full grid)."""
    tokens = args.tokens if tokens is None else tokens
    own = preset(args.preset, pyramid=pyramid).budgets
    try:
        parse_tokens(tokens, own)
    except ValueError:
        return ",".join(map(str, own))
    return tokens


def flat_rows(runs: list[dict]) -> list[dict]:
    """One row per (pyramid, seed, tokens, category): the accuracy (0..1) and n scored."""
    return [
        {
            "pyramid": r["pyramid"],
            "seed": r["seed"],
            "tokens": int(t),
            "category": c,
            "accuracy": v,
            "n": r.get("n", {}).get(c, 0),
        }
        for r in runs
        for t, accs in r["accuracy"].items()
        for c, v in accs.items()
    ]


def summarise(rows: list[dict]) -> dict:
    """{pyramid: {budget: {category: [mean, std, n]}}} over seeds."""
    out: dict = {}
    for r in rows:
        for t, accs in r["accuracy"].items():
            for c, v in accs.items():
                out.setdefault(r["pyramid"], {}).setdefault(t, {}).setdefault(c, []).append(v)
    return {
        p: {
            t: {c: [float(np.mean(v)), float(np.std(v)), len(v)] for c, v in cs.items()}
            for t, cs in ts.items()
        }
        for p, ts in out.items()
    }


def scored_clips(args) -> int:
    """Test clips scored per run: --eval-n of them when the study trains clips (old args: none)."""
    return args.eval_n if getattr(args, "clips", 0) else 0


def command_line(args) -> str:
    """The command that reproduces a study: every flag whose value is not the default."""
    defaults = vars(parse_args([]))
    defaults["name"] = parse_args(["--preset", args.preset]).name
    parts = ["python benchmarks/train_evidence.py"]
    for key, value in vars(args).items():
        if value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def markdown(summary: dict, args, rows: list[dict], base: dict[str, tuple[str, float]]) -> str:
    """The study's table; `base`: fmvr.tasks.constant_baseline on the same test questions."""
    clips = scored_clips(args)
    cols = [*CATEGORIES, "all"] + ([CLIP_CATEGORY] if clips else [])
    lines = [
        f"# Evidence: FMVR vs M3 vs none on the built-in benchmark ({args.preset} preset, {args.device_tag})",
        "",
        f"Command: `{command_line(args)}`",
        "",
        f"Accuracy (%) on {args.eval_n} test scenes x 5 questions"
        + (f" (and {clips} two-frame clips, the frames column)" if clips else "")
        + f", mean +- std over the seeds each cascade finished (of {args.seeds}); "
        + (
            f"stage ground ({args.ground_steps} steps of {args.ground_batch_size}, "
            f"at tokens {args.ground_tokens or args.tokens}) then "
            if args.ground_steps
            else ""
        )
        + f"stage 2 ({TOWERS[args.preset]}), {args.steps} steps of {args.batch_size} at tokens {args.tokens}"
        + " (the none cascade: 576).",
        "",
        "| cascade | seeds | tokens | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    lines.append(
        "| best constant answer | - | - | " + " | ".join(f"{100 * base[c][1]:.1f}" for c in cols) + " |"
    )
    for p, ts in summary.items():
        for t in sorted(ts, key=int, reverse=True):
            lines.append(
                f"| {p} | {ts[t]['all'][2]} | {t} | "
                + " | ".join(f"{100 * ts[t][c][0]:.1f} +- {100 * ts[t][c][1]:.1f}" for c in cols)
                + " |"
            )
    lines += [
        "",
        "The best constant answer per category on the same test questions ("
        + ", ".join(f'{c} "{base[c][0]}"' for c in cols if c != "all")
        + ") is what a model scores that never looks at the image.",
    ]
    mins = sum(r["train_s"] + r["eval_s"] for r in rows) / 60
    lines += ["", f"{len(rows)} runs, {mins:.0f} min of training + evaluation in total."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, cat in zip(axes, ("all", "colour")):
        for p, ts in summary.items():
            budgets = sorted(ts, key=int)
            x = [int(t) for t in budgets]
            y = [100 * ts[t][cat][0] for t in budgets]
            e = [100 * ts[t][cat][1] for t in budgets]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=p)
        ax.set_xscale("log")
        ax.set_xticks([1, 9, 36, 144, 576], ["1", "9", "36", "144", "576"])
        ax.set_xlabel("visual tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"built-in benchmark: {cat}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from train.loss import VisionCache

    cache = VisionCache()
    # seed-major, so an interrupted study still holds every cascade at the first seeds
    plan = [(p, int(s)) for s in args.seeds.split(",") for p in args.pyramids.split(",")]
    if args.finished_only:
        rows = [
            json.loads(f.read_text())
            for p, s in plan
            if (f := Path(args.runs) / f"{p}-s{s}" / "result.json").is_file()
        ]
        if not rows:
            raise SystemExit(f"no finished run of {args.pyramids} x seeds {args.seeds} under {args.runs}")
    else:
        rows = [run_one(args, p, s, cache) for p, s in plan]
    summary = summarise(rows)
    base = constant_baseline("test", args.eval_n, n_clips=scored_clips(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "device": args.device_tag,
                "rows": flat_rows(rows),
                "summary": summary,
                "constant_baseline": {c: {"answer": a, "accuracy": v} for c, (a, v) in base.items()},
                "runs": rows,
            },
            indent=1,
        )
        + "\n"
    )
    table = markdown(summary, args, rows, base)
    (out / f"{args.name}.md").write_text(table)
    plot(summary, out / f"{args.name}.png")
    print(table)
    print(f"wrote {out}/{args.name}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
