"""benchmarks/evidence.py on tiny: one shared start, arms that differ only in the cascade, scores
bootstrapped over scenes, and cached runs reused only by the code that made them."""

from __future__ import annotations

import json

from fmvr import tasks

FAST = ["--preset", "tiny", "--variant", "detail", "--bench-n", "4", "--batch-size", "2", "--ground-batch-size", "2", "--eval-n", "3",
        "--start-ground-steps", "2", "--start-steps", "2", "--adapt-steps", "2", "--boot", "200", "--no-bf16",
        "--threads", "1"]  # fmt: skip


def test_a_tiny_study_writes_rows_intervals_and_fmvr_minus_m3(tmp_path, benchmark_script):
    ev = benchmark_script("evidence")
    argv = [*FAST, "--seeds", "0", "--arms", "fmvr-frozen,m3-frozen", "--runs", str(tmp_path / "runs")]
    assert ev.main([*argv, "--out", str(tmp_path / "out"), "--name", "e"]) == 0
    data = json.loads((tmp_path / "out" / "e.json").read_text())
    cats = {*tasks.categories("detail"), "all"}
    assert {(r["arm"], r["tokens"]) for r in data["rows"]} == {("none", 576)} | {
        (a, t) for a in ("fmvr-frozen", "m3-frozen") for t in (576, 144, 36, 9, 1)
    }
    assert {r["category"] for r in data["rows"]} == cats and all(
        0 <= r["accuracy"] <= 1 for r in data["rows"]
    )
    for r in data["accuracy"]:
        assert r["low"] <= r["accuracy"] <= r["high"] and r["scenes"] == 3
    assert {(d["lm"], d["tokens"]) for d in data["differences"]} == {
        ("frozen", t) for t in (576, 144, 36, 9, 1)
    }
    assert data["code"]["source_sha256"] and data["constant_baseline"]["all"]["accuracy"] > 0
    runs = tmp_path / "runs" / "tiny-detail"
    assert {p.name for p in runs.iterdir()} == {"start-s0", "fmvr-frozen-plr0.001-s0", "m3-frozen-s0"}
    fmvr = json.loads((runs / "fmvr-frozen-plr0.001-s0" / "final" / "extra.json").read_text())["train_config"]
    m3 = json.loads((runs / "m3-frozen-s0" / "final" / "extra.json").read_text())["train_config"]
    differ = {k for k in fmvr if fmvr[k] != m3[k]}
    assert differ <= {"out", "pyramid", "pyramid_lr"}, differ  # the arms differ only in the block
    assert fmvr["init"] == m3["init"] == str(runs / "start-s0" / "stage2" / "final")


def test_a_cached_run_of_other_code_is_not_reused(tmp_path, benchmark_script, monkeypatch):
    ev = benchmark_script("evidence")
    calls = []
    args = ev.build_parser().parse_args([*FAST, "--runs", str(tmp_path)])
    args.bf16 = False
    from train.stages import TrainConfig

    cfg = TrainConfig(
        out=str(tmp_path / "r"), stage="stage1", bench_n=2, steps=1, batch_size=2, progress=False
    )

    def fake_train(c):
        calls.append(c)
        (tmp_path / "r" / "final").mkdir(parents=True, exist_ok=True)
        (tmp_path / "r" / "final" / "extra.json").write_text(json.dumps({"train_config": c.to_dict()}))

    monkeypatch.setattr(ev, "run_code", lambda: "aaaa")
    ev.trained(tmp_path / "r", cfg, fake_train)
    ev.trained(tmp_path / "r", cfg, fake_train)  # same config, same code: reused
    assert len(calls) == 1
    monkeypatch.setattr(ev, "run_code", lambda: "bbbb")  # the code changed
    ev.trained(tmp_path / "r", cfg, fake_train)
    assert len(calls) == 2 and list(tmp_path.glob("r.stale-*"))  # trained again; the old run moved aside
    (tmp_path / "ev" / "result.json").parent.mkdir()
    (tmp_path / "ev" / "result.json").write_text(json.dumps({"run_source_sha256": "aaaa"}))
    assert ev.cached(tmp_path / "ev") is None  # an evaluation made by other code is not reused either
