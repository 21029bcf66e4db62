"""dev/tower_probe.py: the box-to-grid read-out, and the script end to end on tiny."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_box_features_read_the_cells_under_the_box_at_each_budget(dev_script):
    tp = dev_script("tower_probe")
    f = np.arange(24 * 24, dtype=np.float64).reshape(24, 24, 1)  # cell (r, c) holds 24 r + c
    # scene pixels 0..28 cover grid cells 0..1 (336 px -> 24 cells: 14 px each)
    assert tp.box_features(f, (0, 0, 28, 28), 576)[0] == pytest.approx(np.mean([0, 1, 24, 25]))
    # at 36 tokens (4x4 pooling) a box centred in cell (5, 9) reads pooled cell (1, 2)
    box = (9 * 14, 5 * 14, 10 * 14, 6 * 14)
    assert tp.box_features(f, box, 36)[0] == pytest.approx(f[4:8, 8:12].mean())


def test_tiny_probe_writes_json_and_markdown(tmp_path, dev_script):
    tp = dev_script("tower_probe")
    assert (
        tp.main(
            [
                "--preset",
                "tiny",
                "--train-n",
                "6",
                "--test-n",
                "3",
                "--tokens",
                "576,9",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "tower_probe_tiny.json").read_text())
    assert {(r["target"], r["tokens"]) for r in rep["rows"]} == {(t, k) for t in tp.TARGETS for k in (576, 9)}
    digit = next(r for r in rep["rows"] if r["target"] == "digit")
    assert digit["n_test"] == 3 and 0.0 <= digit["accuracy"] <= 1.0
    assert "| 9 | shape |" in (tmp_path / "tower_probe_tiny.md").read_text()


def test_unknown_budget_is_refused(tmp_path, dev_script):
    with pytest.raises(SystemExit):
        dev_script("tower_probe").main(["--preset", "tiny", "--tokens", "50", "--out", str(tmp_path)])
