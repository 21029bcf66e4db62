"""fmvr.staging: folders of live owners are kept, those of dead ones swept; SIGTERM cleans up;
the free-space refusal; a replaced folder is never missing for a reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fmvr import atomic, staging

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pathlib import Path
from fmvr import atomic
with atomic.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "payload").write_bytes(b"x" * 100_000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _hold(target: Path) -> tuple[subprocess.Popen, Path]:
    """A writer (another process) that stages beside `target` and waits."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    return p, Path(p.stdout.readline().strip())


def test_a_live_owners_folder_is_kept_and_a_dead_ones_swept(tmp_path, capsys):
    target = tmp_path / "bundle"
    proc, staged = _hold(target)
    try:
        assert staged.is_dir() and staged.name.startswith(".bundle.partial-")
        with atomic.atomic_dir(target) as tmp:  # another writer, same target
            (tmp / "f").write_text("1")
        assert staged.is_dir(), "a live writer's staging folder was removed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert staged.is_dir()  # SIGKILL: nothing could clean up
    assert staging.sweep(target) >= 100_000
    assert not staged.exists() and "freed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_a_reused_pid_does_not_keep_a_dead_owners_folder(tmp_path):
    """Same pid as a live process, another start time: the owner is gone."""
    if staging.start_time(os.getpid()) in (None, 0):
        pytest.skip("no /proc start times here")
    stale = tmp_path / f".b.partial-{os.getpid()}-1-abcd1234"
    stale.mkdir()
    legacy = tmp_path / ".b.partial-k2j_9x"  # no owner in the name: never ours to remove
    legacy.mkdir()
    staging.sweep(tmp_path / "b")
    assert not stale.exists() and legacy.exists()


def test_sweep_puts_back_a_folder_left_aside_by_a_killed_fallback_swap(tmp_path):
    target = tmp_path / "b"
    aside = tmp_path / ".b.old-999999999-1-abcd1234"
    (aside / "b").mkdir(parents=True)
    (aside / "b" / "manifest.json").write_text("old")
    staging.sweep(target)
    assert (target / "manifest.json").read_text() == "old" and os.listdir(tmp_path) == ["b"]


def test_sigterm_cleans_up_like_an_exception(tmp_path):
    target = tmp_path / "bundle"
    proc, staged = _hold(target)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not staged.exists() and os.listdir(tmp_path) == []


def test_refused_before_writing_when_the_estimate_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "free_bytes", lambda path: 100 << 20)
    target = tmp_path / "ckpt"
    with (
        pytest.raises(staging.NotEnoughSpace) as e,
        atomic.atomic_dir(target, need=50 << 20, what="checkpoint ckpt"),
    ):
        raise AssertionError("the block must not run")
    msg = str(e.value)
    assert str(target) in msg and "50.0 MB" in msg and "100.0 MB free" in msg, msg
    assert os.listdir(tmp_path) == []
    with atomic.atomic_dir(target, need=10 << 20) as tmp:  # 10 MB * 1.1 + 64 MB fits in 100 MB
        (tmp / "f").write_text("1")


def test_a_reader_never_finds_the_folder_missing_during_20_replacements(tmp_path, monkeypatch):
    """Every rename (and exchange) is slowed by 5 ms so that any moment without the folder is
    wide enough for the polling reader to see."""
    target = tmp_path / "b"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("0")
    real_replace, real_exchange = os.replace, atomic.exchange

    def slow_replace(a, b):
        real_replace(a, b)
        time.sleep(0.005)

    def slow_exchange(a, b):
        done = real_exchange(a, b)
        time.sleep(0.005)
        return done

    monkeypatch.setattr(atomic.os, "replace", slow_replace)
    monkeypatch.setattr(atomic, "exchange", slow_exchange)
    seen: list[str] = []
    missing = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal missing
        while not stop.is_set():
            try:
                seen.append((target / "manifest.json").read_text())
            except OSError:
                missing += 1

    reader = threading.Thread(target=poll)
    reader.start()
    for i in range(1, 21):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "manifest.json").write_text(str(i))
        time.sleep(0.002)
    stop.set()
    reader.join()
    assert missing == 0, f"the folder was missing {missing} times out of {missing + len(seen)} polls"
    assert len(set(seen)) > 5 and (target / "manifest.json").read_text() == "20"
    assert os.listdir(tmp_path) == ["b"]
