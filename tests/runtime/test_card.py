"""The budget card (`python -m runtime card`): every budget rendered, accuracy through the
runtime, timings only without the benchmark, a missing profile named, atomic writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from runtime.__main__ import main
from runtime.tools import card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_times(budgets) -> dict:
    """Per budget and stage, p50 < p95, distinct per budget so rows cannot be swapped unnoticed."""
    return {
        t: {
            s: {"p50": t + k, "p95": 2 * (t + k), "n": 5, "source": "measured"}
            for k, s in enumerate(card.STAGES)
        }
        for t in budgets
    }


def fake_accuracy(budgets) -> dict:
    """(i + 1) of 4 right in the i-th category (digit: 4 of 4); 14 of 20 in all."""
    cats = card.CATEGORIES[:-1]
    return {t: card.tally({c: [j <= i for j in range(4)] for i, c in enumerate(cats)}) for t in budgets}


@pytest.fixture
def fake_card(synthetic_profile) -> dict:
    budgets = sorted(synthetic_profile.vision_ms)
    meta = {"source": "runtime", "note": "fake accuracies", "split": "test", "bench_n": 4}
    timing = {"image": "a fake frame", "prompt": "p", "runs": 5, "warmup": 0, "decode_tokens": 4}
    return card.build_card(synthetic_profile, fake_times(budgets), fake_accuracy(budgets), timing, meta)


def test_a_card_from_a_fake_profile_renders_every_budget(fake_card, tmp_path):
    written, _ = card.write_card(tmp_path, fake_card)
    paths = card.card_paths(tmp_path, fake_card["key"])
    assert paths["json"].name == f"card-{fake_card['key']}.json" and paths["json"] in written
    saved = json.loads(paths["json"].read_text())
    assert [r["budget"] for r in saved["budgets"]] == [576, 144, 36, 9, 1]
    for row in saved["budgets"]:
        t = row["budget"]
        for k, s in enumerate(card.STAGES):
            assert (row["stages_ms"][s]["p50"], row["stages_ms"][s]["p95"]) == (t + k, 2 * (t + k))
        assert row["ttft_ms"] == {"p50": 3 * t + 3, "p95": 6 * t + 6}  # preprocess + vision + prefill
        assert row["accuracy"]["digit"] == {"correct": 4, "n": 4, "accuracy": 1.0}
        assert row["accuracy"]["all"] == {"correct": 14, "n": 20, "accuracy": 0.7}
    md = paths["md"].read_text().splitlines()
    for t in (576, 144, 36, 9, 1):
        (line,) = [x for x in md if x.startswith(f"| {t} |")]
        assert f"{t}.00 / {2 * t:.2f}" in line and line.endswith(
            "| 25.0 | 50.0 | 75.0 | 100.0 | 100.0 | 70.0 |"
        )


def test_the_png_is_a_png(fake_card, tmp_path):
    pytest.importorskip("matplotlib")
    written, notes = card.write_card(tmp_path, fake_card)
    png = card.card_paths(tmp_path, fake_card["key"])["png"]
    assert png in written and not notes and png.read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_the_png_is_skipped_with_a_note(fake_card, tmp_path, monkeypatch):
    stale = card.card_paths(tmp_path, fake_card["key"])["png"]
    stale.write_bytes(b"old")
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it -> ImportError
    written, notes = card.write_card(tmp_path, fake_card)
    assert [p.suffix for p in written] == [".json", ".md"] and not stale.exists()
    assert "matplotlib is not installed" in notes[0]


def test_a_failed_write_leaves_the_old_card(fake_card, tmp_path, monkeypatch):
    card.write_card(tmp_path, fake_card)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(_card):
        raise RuntimeError("disk full while rendering")

    monkeypatch.setattr(card, "render_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        card.write_card(tmp_path, {**fake_card, "created": "later"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # same files, no temp files


def test_the_profile_answers_the_stages_it_has_p95_or_samples_for(synthetic_profile):
    synthetic_profile.vision_ms[36]["p95"] = 12.5
    synthetic_profile.prefill_points = [[40 + 9, 1.0 + k] for k in range(card.MIN_SAMPLES)]
    have = card.profile_stats(synthetic_profile, [36, 9], text_tokens=40)
    assert have[36] == {"vision": {"p50": 10.0, "p95": 12.5, "n": 5, "source": "profile"}}
    assert have[9]["prefill"]["source"] == "profile" and have[9]["prefill"]["p50"] == 3.0
    assert "vision" not in have[9]  # the profile holds only p50/p90 there: measured instead


class FakePipe:
    """Answers right at budget 9, wrong at budget 1; records the options each ask got."""

    budgets = (9, 1)

    def __init__(self, targets):
        self.targets, self.calls = list(targets), []

    def ask(self, image, question, **kw):
        self.calls.append({"image": type(image), **kw})
        target = self.targets.pop(0)
        return SimpleNamespace(answer=f" {target.upper()}." if kw["tokens"] == 9 else "no idea")


def test_evaluate_forces_each_budget_greedily_and_counts_correct_over_n():
    from fmvr import tasks

    questions = card.bench_questions(3, 0)
    pipe = FakePipe([a for *_, a in questions for _ in FakePipe.budgets])
    acc = card.evaluate(pipe, questions)
    assert not pipe.targets and {(c["tokens"], c["temperature"]) for c in pipe.calls} == {(9, 0.0), (1, 0.0)}
    assert acc[9]["all"] == {"correct": 15, "n": 15, "accuracy": 1.0}
    assert all(acc[1][c] == {"correct": 0, "n": 3, "accuracy": 0.0} for c in tasks.CATEGORIES)
    assert (*tasks.CATEGORIES, "all") == card.CATEGORIES == tuple(acc[1])


def test_the_benchmark_is_built_in_process_without_a_subprocess(monkeypatch):
    """The card needs no source tree and no child process: fmvr.tasks renders the questions."""

    def refuse(*a, **kw):
        raise AssertionError("the card started a subprocess")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    questions = card.bench_questions(2, 0)
    pipe = FakePipe([a for *_, a in questions for _ in FakePipe.budgets])
    args = SimpleNamespace(accuracy=None, bench_n=2, bench_seed=0, bench_variant="easy")
    acc, meta = card._accuracy(pipe, args)
    assert meta["source"] == "runtime" and meta["bench_n"] == 2
    assert {c: acc[9][c]["n"] for c in card.CATEGORIES} == {
        **dict.fromkeys(card.CATEGORIES[:-1], 2),
        "all": 10,
    }
    assert acc[9]["all"]["accuracy"] == 1.0 and acc[1]["all"]["accuracy"] == 0.0


def test_without_scikit_learn_the_card_has_timings_only(monkeypatch, fake_card):
    import builtins

    real = builtins.__import__

    def no_sklearn(name, *a, **kw):
        if name.startswith("sklearn"):
            raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
        return real(name, *a, **kw)

    from fmvr.tasks import scene as task_scene

    task_scene.digit_scans.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    acc, meta = card._accuracy(
        FakePipe([]), SimpleNamespace(accuracy=None, bench_n=2, bench_seed=0, bench_variant="easy")
    )
    monkeypatch.undo()
    task_scene.digit_scans.cache_clear()
    assert acc is None and meta["source"] == "none" and "fmvr-edge[bench]" in meta["note"]
    timings_only = card.build_card(
        SimpleNamespace(device={"cpu": "c"}, key="k", backend="b", created=""),
        {r["budget"]: r["stages_ms"] for r in fake_card["budgets"]},
        None,
        fake_card["timing"],
        meta,
    )
    md = card.render_markdown(timings_only)
    assert "No module named" in md and md.splitlines()[-1].endswith("| - | - | - | - | - | - |")


def test_accuracy_from_a_train_eval_file(tmp_path):
    res = {
        "accuracy": {"36": {"colour": 0.5, "all": 0.3}},
        "n_scenes": 10,
        "n_questions": 50,
        "split": "test",
    }
    (tmp_path / "eval.json").write_text(json.dumps(res))
    acc, note = card.accuracy_from_file(tmp_path / "eval.json", [576, 36])
    assert acc == {36: {"colour": card.entry(5, 10), "all": card.entry(15, 50)}} and "train.eval" in note
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a train.eval --out JSON"):
        card.accuracy_from_file(tmp_path / "bad.json", [36])


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def test_a_missing_profile_names_the_command_that_makes_one(bundle, capsys):
    assert main(["card", "--bundle", str(bundle), "--bench-n", "1"]) == 2
    err = capsys.readouterr().err
    assert f"python -m runtime profile --bundle {bundle}" in err and "--profile-if-missing" in err
    assert not list(bundle.glob("card-*"))


def test_a_card_of_the_tiny_bundle_through_the_runtime(bundle, capsys):
    flags = ["--bench-n", "2", "--runs", "2", "--warmup", "0", "--decode-tokens", "2"]
    assert main(["card", "--bundle", str(bundle), "--profile-if-missing", *flags]) == 0
    out = capsys.readouterr().out
    (profile,) = bundle.glob("profile-*.json")
    saved = json.loads(bundle.joinpath(profile.name.replace("profile-", "card-")).read_text())
    assert saved["accuracy"]["source"] == "runtime" and saved["accuracy"]["categories"] == list(
        card.CATEGORIES
    )
    assert [r["budget"] for r in saved["budgets"]] == [576, 144, 36, 9, 1]
    for row in saved["budgets"]:
        assert all(0 < s["p50"] <= s["p95"] for s in row["stages_ms"].values())
        for c, a in row["accuracy"].items():
            assert a["n"] == (10 if c == "all" else 2) and a["accuracy"] == a["correct"] / a["n"]
    assert "wrote" in out and "next: python -m runtime ask --bundle" in out


@pytest.mark.parametrize("flags", [["--bench-n", "-1"], ["--runs", "0"], ["--accuracy"]])
def test_bad_flags_are_refused_before_the_bundle_loads(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        main(["card", "--bundle", str(tmp_path), *flags])
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_the_card_asks_the_variant_it_is_told():
    questions = card.bench_questions(2, 0, "detail")
    assert len(questions) == 10 and {c for _, c, _, _ in questions} == {
        "colour",
        "shape",
        "count",
        "where",
        "exist",
    }
    pipe = FakePipe([a for *_, a in questions for _ in FakePipe.budgets])
    acc = card.evaluate(pipe, questions)
    assert acc[9]["all"] == {"correct": 10, "n": 10, "accuracy": 1.0} and acc[9]["shape"]["n"] == 2
