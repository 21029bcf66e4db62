import json
import os
from pathlib import Path

import pytest

from fmvr import atomic


def test_write_json_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(p.parent) == ["a.json"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic.open_atomic(p) as f:
        f.write("half")
        raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_replaces_and_failure_keeps_old(tmp_path):
    d = tmp_path / "ckpt"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(d) as tmp:
        (tmp / "f").write_text("2")
        raise KeyboardInterrupt
    assert (d / "f").read_text() == "1"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(os.listdir(d)) == ["g"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_swap_restores_old_folder_when_rename_fails(tmp_path, monkeypatch):
    """The fallback swap (no renameat2 exchange): two renames, the old folder put back."""
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    d, new = tmp_path / "d", tmp_path / "new"
    d.mkdir()
    (d / "f").write_text("old")
    new.mkdir()
    real = os.replace

    def flaky(src, dst):
        if Path(src) == new:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        atomic.swap_into_place(new, d)
    assert (d / "f").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["d", "new"]  # nothing left aside


def test_open_atomic_refuses_append():
    with pytest.raises(ValueError, match="mode"), atomic.open_atomic("x", "a"):
        pass
