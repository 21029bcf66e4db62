"""A budget card per device (`python -m runtime card --bundle B`): what each budget buys here.

Per budget, p50/p95 ms per stage (preprocess, vision, prefill, decode per token) and accuracy per
category of the built-in benchmark answered through this runtime (Pipeline.ask, budget forced,
greedy), saved beside the profile under its device key: card-<key>.json, .md and .png (matplotlib).
A stage comes from the profile where it holds a p95 or raw samples (prefill: its points), else it
is measured now with runtime.measure's frame, prompt and timers. JSON, schema 1:

    {"schema": 1, "device": {...}, "key", "backend", "created", "profile": {"file", "created"},
     "timing": {"unit": "ms", "image", "prompt", "runs", "warmup", "decode_tokens"},
     "accuracy": {"source": "runtime" | "file" | "none", "note", "split", "bench_n", "seed",
                  "max_new_tokens", "categories": ["colour", ..., "all"]},
     "budgets": [{"budget": 576, "stages_ms": {stage: {"p50", "p95", "n", "source"}},
                  "ttft_ms": {"p50", "p95"},  # sums of the stage percentiles
                  "accuracy": {category: {"correct", "n", "accuracy"}} | null}, ...]}

The benchmark comes from fmvr.tasks in-process (torch-free; its digit cards need scikit-learn, the
`bench` extra): without scikit-learn the card has timings only and says so.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmvr.atomic import write_bytes, write_text
from fmvr.tasks import CATEGORIES as TASK_CATEGORIES
from runtime.profile import Profile, ProfileError, load_profile, now_iso, percentiles

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

CARD_SCHEMA = 1
STAGES = ("preprocess", "vision", "prefill", "decode_per_token")
CATEGORIES = (*TASK_CATEGORIES, "all")  # when no accuracy says otherwise
ANSWER_TOKENS = 8  # greedy answer limit of the benchmark (as train.eval), and the plot's decode bar
MIN_SAMPLES = 5  # fewer profile samples than this for a stage: measure it instead
SPLIT = "test"
BAR_COLOURS = ("#d0d0d0", "#9ecae1", "#4292c6", "#08519c")  # the stages: greys to blues
LINE_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")  # categories


def quantiles(samples: list[float], source: str = "measured") -> dict[str, Any]:
    """p50 and p95 of samples (runtime.profile.percentiles), with where they came from."""
    return {**percentiles(samples, (50, 95)), "source": source}


def profile_stats(profile: Profile, budgets: list[int], text_tokens: int) -> dict[int, dict[str, Any]]:
    """The stages the profile itself answers at p50 and p95: vision with a stored p95, prefill
    from its raw points at this budget's prompt length (text_tokens + T)."""
    out: dict[int, dict[str, Any]] = {}
    for t in budgets:
        have: dict[str, Any] = {}
        v = profile.vision_ms.get(t, {})
        if "p95" in v:
            have["vision"] = {"p50": v["p50"], "p95": v["p95"], "n": int(v.get("n", 0)), "source": "profile"}
        pts = [float(ms) for n, ms in profile.prefill_points if int(n) == text_tokens + t]
        if len(pts) >= MIN_SAMPLES:
            have["prefill"] = quantiles(pts, "profile")
        out[t] = have
    return out


def measure_samples(pipe: Pipeline, warmup: int, runs: int, decode_tokens: int) -> dict[int, dict[str, list]]:
    """Per budget and stage, `runs` samples (ms) with runtime.measure's frame, prompt and timers."""
    from runtime.measure import PROFILE_PROMPT, decode_ms_per_token, prefill_ms, synthetic_image, time_ms

    image = synthetic_image()
    pre = time_ms(lambda: pipe.prepare(image), warmup, runs)
    x = pipe.prepare(image)  # [1, 3, S, S] pixels or [1, H, W, 3] frames
    ids = pipe.prompt_ids(PROFILE_PROMPT)
    feats = {t: f[0] for t, f in pipe.vision.encode(x, list(pipe.budgets)).items()}  # T -> [T, D]
    embeds = {t: pipe.embeddings(ids, feats[t]) for t in pipe.budgets}  # T -> [1, S, D]
    out = {t: {"preprocess": pre, "vision": [], "prefill": [], "decode_per_token": []} for t in pipe.budgets}
    for _ in range(warmup):
        for t in pipe.budgets:
            pipe.vision.encode(x, [t])
            decode_ms_per_token(pipe, embeds[t], 2)
    for _ in range(runs):  # round-robin: a noisy neighbour slows every budget alike
        for t in pipe.budgets:
            out[t]["vision"] += time_ms(lambda t=t: pipe.vision.encode(x, [t]), 0, 1)
            out[t]["prefill"].append(prefill_ms(pipe, embeds[t]))
            out[t]["decode_per_token"].append(decode_ms_per_token(pipe, embeds[t], decode_tokens))
    return out


def timings(pipe: Pipeline, profile: Profile, warmup: int, runs: int, decode_tokens: int) -> dict[int, dict]:
    """Per budget, {stage: {p50, p95, n, source}}: the profile's where it has them, else measured."""
    from runtime.measure import PROFILE_PROMPT

    budgets = list(pipe.budgets)
    have = profile_stats(profile, budgets, len(pipe.prompt_ids(PROFILE_PROMPT)) - 1)
    if all(len(have[t]) == len(STAGES) for t in budgets):
        return have
    got = measure_samples(pipe, warmup, runs, decode_tokens)
    return {t: {s: have[t].get(s) or quantiles(got[t][s]) for s in STAGES} for t in budgets}


def tally(hits: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
    """{category: [hit, ...]} -> {category: {correct, n, accuracy}} plus "all"."""
    rows = {**hits, "all": [h for c in hits for h in hits[c]]}
    return {c: entry(sum(h), len(h)) for c, h in rows.items()}


def entry(correct: int, n: int) -> dict[str, Any]:
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n if n else None}


Question = tuple[Any, str, str, str]  # (image, category, question, answer)


def bench_questions(n: int, seed: int, variant: str = "easy") -> list[Question]:
    """The benchmark's test questions, rendered in-process (fmvr.tasks is torch-free): one PIL
    image per scene, shared by its questions. ImportError without scikit-learn (its digits)."""
    from fmvr import tasks

    out: list[Question] = []
    for scene in tasks.scenes(SPLIT, n, seed, variant):
        image = tasks.render_scene(scene)
        out += [(image, c, q, a) for c, q, a in scene.questions]
    return out


def evaluate(pipe: Pipeline, questions: list[Question]) -> dict[int, dict]:
    """Accuracy per budget and category: each question through pipe.ask at each forced budget, greedy."""
    from fmvr.tasks import score

    seen = {c for _, c, _, _ in questions}
    cats = [c for c in CATEGORIES if c in seen] + sorted(seen - set(CATEGORIES))
    hits: dict[int, dict[str, list[bool]]] = {t: {c: [] for c in cats} for t in pipe.budgets}
    for k, (image, cat, question, target) in enumerate(questions):
        for t in pipe.budgets:
            r = pipe.ask(image, question, tokens=t, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
            hits[t][cat].append(score(r.answer, target))
        if (k + 1) % 25 == 0 or k + 1 == len(questions):
            print(f"  card: answered {k + 1}/{len(questions)} questions", file=sys.stderr, flush=True)
    return {t: tally(h) for t, h in hits.items()}


def accuracy_from_file(path: str | Path, budgets: list[int]) -> tuple[dict[int, dict], str]:
    """Accuracy from a `python -m train.eval --out` JSON (PyTorch, not this runtime)."""
    try:
        d = json.loads(Path(path).read_text())
        n_cat, n_all = int(d["n_scenes"]), int(d["n_questions"])
        acc = {int(t): row for t, row in d["accuracy"].items()}
        rows = {
            t: {c: _from_rate(a, n_all if c == "all" else n_cat) for c, a in row.items()}
            for t, row in acc.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--accuracy {path}: not a train.eval --out JSON ({type(e).__name__}: {e})") from e
    note = f"from {path} (train.eval, PyTorch, {n_cat} scenes, {d.get('split', '?')} split)"
    return {t: rows[t] for t in budgets if t in rows}, note


def _from_rate(rate: float, n: int) -> dict[str, Any]:
    return entry(round(float(rate) * n), n)


def build_card(
    profile: Profile, times: dict[int, dict], accuracy: dict[int, dict] | None, timing: dict, acc_meta: dict
) -> dict[str, Any]:
    """The card's JSON (schema in the module docstring), rows largest budget first."""
    rows, acc = [], accuracy or {}
    for t in sorted(times, reverse=True):
        stages = times[t]
        ttft = {q: round(sum(stages[s][q] for s in STAGES[:3]), 4) for q in ("p50", "p95")}
        rows.append({"budget": t, "stages_ms": stages, "ttft_ms": ttft, "accuracy": acc.get(t)})
    return {
        "schema": CARD_SCHEMA,
        "device": profile.device,
        "key": profile.key,
        "backend": profile.backend,
        "created": now_iso(),
        "profile": {"file": f"profile-{profile.key}.json", "created": profile.created},
        "timing": {"unit": "ms", **timing},
        "accuracy": {**acc_meta, "categories": list(next(iter(acc.values()), CATEGORIES))},
        "budgets": rows,
    }


def _pair(s: dict) -> str:
    return f"{s['p50']:.2f} / {s['p95']:.2f}"


def _pct(acc: dict | None, c: str) -> str:
    return "-" if math.isnan(a := _rate(acc, c)) else f"{a:.1f}"


def render_markdown(card: dict) -> str:
    tm, am, rows = card["timing"], card["accuracy"], card["budgets"]
    cats = am["categories"]
    src = ", ".join(f"{s} {'/'.join(sorted({r['stages_ms'][s]['source'] for r in rows}))}" for s in STAGES)
    counted = next((r["accuracy"] for r in rows if r["accuracy"]), None)
    n = f" (n = {counted[cats[0]]['n']} per category, {counted['all']['n']} in all)" if counted else ""
    head = ["budget", "preprocess", "vision", "prefill", "decode/token", "TTFT (sum)", *cats]
    table = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["budget"]), *(_pair(r["stages_ms"][s]) for s in STAGES), _pair(r["ttft_ms"])]
        table.append("| " + " | ".join(cells + [_pct(r["accuracy"], c) for c in cats]) + " |")
    paragraphs = [
        f"# Budget card: {card['key']}",
        f"Device: {', '.join(f'{k} {v}' for k, v in card['device'].items())}; vision backend "
        f"{card['backend']}; profile {card['profile']['file']} ({card['profile']['created']}); "
        f"card {card['created']}.",
        f"Times in ms, p50 / p95 over {tm['runs']} runs on {tm['image']}; sources: {src}. Decode is per "
        "token; TTFT (sum) adds the preprocess, vision and prefill percentiles.",
        f"Accuracy in % correct per benchmark category: {am['note']}{n}.",
        "\n".join(table),
    ]
    return "\n\n".join(paragraphs) + "\n"


def _rate(acc: dict | None, c: str) -> float:
    a = (acc or {}).get(c, {}).get("accuracy")
    return math.nan if a is None else 100 * a


def render_png(card: dict) -> bytes | None:
    """Stacked bars of p95 ms per stage per budget, accuracy per category as lines on a second
    axis; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = card["budgets"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(9, 5.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bottom = np.zeros(len(rows))
    bars = [(s, 1, s) for s in STAGES[:3]] + [(STAGES[3], ANSWER_TOKENS, f"decode ({ANSWER_TOKENS} tokens)")]
    for (stage, scale, label), colour in zip(bars, BAR_COLOURS):
        h = np.array([r["stages_ms"][stage]["p95"] * scale for r in rows])
        ax.bar(x, h, 0.6, bottom=bottom, label=label, color=colour)
        bottom += h
    ax.set_xticks(x, [str(r["budget"]) for r in rows])
    ax.set(xlabel="visual-token budget", ylabel="p95 time per stage (ms)")
    handles, labels = ax.get_legend_handles_labels()
    if any(r["accuracy"] for r in rows):
        ax2 = ax.twinx()
        for i, c in enumerate(card["accuracy"]["categories"]):
            colour, width = ("black", 2.5) if c == "all" else (LINE_COLOURS[i % len(LINE_COLOURS)], 1.3)
            ax2.plot(x, [_rate(r["accuracy"], c) for r in rows], "o-", label=c, color=colour, lw=width)
        ax2.set(ylim=(0, 105), ylabel="accuracy (% correct, lines)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    ax.set_title(f"{card['key']} ({card['backend']}): what each budget costs and buys", fontsize=10)
    fig.subplots_adjust(bottom=0.2, top=0.93)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def card_paths(bundle_dir: str | Path, key: str) -> dict[str, Path]:
    return {ext: Path(bundle_dir) / f"card-{key}.{ext}" for ext in ("json", "md", "png")}


def write_card(bundle_dir: str | Path, card: dict) -> tuple[list[Path], list[str]]:
    """Render everything first, then write each file atomically: a failure leaves the old card."""
    paths = card_paths(bundle_dir, card["key"])
    text, md, png = json.dumps(card, indent=2) + "\n", render_markdown(card), render_png(card)
    write_text(paths["json"], text)
    write_text(paths["md"], md)
    if png is not None:
        write_bytes(paths["png"], png)
        return list(paths.values()), []
    note = "no PNG: matplotlib is not installed (pip install matplotlib)"
    if paths["png"].exists():
        paths["png"].unlink()
        note += f"; removed the stale {paths['png'].name}"
    return [paths["json"], paths["md"]], [note]


def _count(least: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= {least}")
        return int(text)

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `card` subcommand's own flags (runtime.__main__ adds --bundle, --backend, ...)."""
    n, flag = _count, p.add_argument
    scenes = "benchmark test scenes, 5 questions each, asked at every budget (default 20; 0: timings only)"
    flag("--bench-n", metavar="N", type=n(0), default=20, help=scenes)
    flag("--bench-seed", metavar="SEED", type=n(0), default=0, help="benchmark seed, as train.eval's")
    flag(
        "--bench-variant",
        default="easy",
        choices=("easy", "detail"),
        help="benchmark variant: easy (3x3 layout) or detail (many small objects), as train.eval's",
    )
    flag("--accuracy", metavar="FILE", help="take accuracy from a `python -m train.eval --out` JSON instead")
    flag("--warmup", type=n(0), default=2, help="untimed runs before timing the stages (default 2)")
    flag("--runs", type=n(1), default=10, help="timed runs per stage and budget (default 10)")
    flag("--decode-tokens", metavar="N", type=n(1), default=16, help="tokens per decode run (default 16)")
    missing = (
        "no profile for this device: measure one first (else exit 2, naming `python -m runtime profile`)"
    )
    flag("--profile-if-missing", action="store_true", help=missing)


def _load_profile(pipe: Pipeline, args: argparse.Namespace) -> Profile:
    try:
        return load_profile(pipe.bundle_dir, pipe.device, pipe.vision.name)
    except ProfileError as e:
        if not args.profile_if_missing:
            raise ProfileError(f"{e}; or pass --profile-if-missing to `runtime card`") from e
    return pipe.measure_profile(warmup=args.warmup, runs=args.runs)


def _accuracy(pipe: Pipeline, args: argparse.Namespace) -> tuple[dict | None, dict]:
    meta = {"split": SPLIT, "bench_n": args.bench_n, "seed": args.bench_seed, "max_new_tokens": ANSWER_TOKENS}
    meta["variant"] = args.bench_variant
    if args.accuracy:
        acc, note = accuracy_from_file(args.accuracy, list(pipe.budgets))
        return acc, {"source": "file", "note": note, "file": str(args.accuracy)}
    if args.bench_n == 0:
        return None, {**meta, "source": "none", "note": "not measured (--bench-n 0): timings only"}
    try:
        questions = bench_questions(args.bench_n, args.bench_seed, args.bench_variant)
    except ImportError as e:
        why = (
            f"timings only: the built-in benchmark's digit cards need scikit-learn ({e}); "
            "pip install 'fmvr-edge[bench]', or pass --accuracy FILE (a train.eval --out JSON)"
        )
        return None, {**meta, "source": "none", "note": why}
    acc = evaluate(pipe, questions)
    note = (
        f"built-in benchmark ({args.bench_variant} variant), {SPLIT} split, {args.bench_n} scenes, "
        "through this runtime (greedy)"
    )
    return acc, {**meta, "source": "runtime", "note": note}


def run(pipe: Pipeline, args: argparse.Namespace) -> int:
    """`python -m runtime card`: measure, evaluate, write the card, print where it went."""
    from runtime.measure import PROFILE_PROMPT

    profile = _load_profile(pipe, args)
    times = timings(pipe, profile, args.warmup, args.runs, args.decode_tokens)
    accuracy, acc_meta = _accuracy(pipe, args)
    timing = {"image": "a 640x480 JPEG (runtime.measure.synthetic_image)", "prompt": PROFILE_PROMPT}
    timing.update(runs=args.runs, warmup=args.warmup, decode_tokens=args.decode_tokens)
    card = build_card(profile, times, accuracy, timing, acc_meta)
    written, notes = write_card(pipe.bundle_dir, card)
    print(render_markdown(card))
    for note in [*notes, *([acc_meta["note"]] if accuracy is None else [])]:
        print(f"note: {note}")
    for path in written:
        print(f"wrote {path}")
    mid = card["budgets"][len(card["budgets"]) // 2]
    print(
        f"next: python -m runtime ask --bundle {args.bundle} --image IMG --prompt '...' "
        f"--latency-ms {math.ceil(mid['ttft_ms']['p95'])}   (p95 TTFT of budget {mid['budget']})"
    )
    return 0
