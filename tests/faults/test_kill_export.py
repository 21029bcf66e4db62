"""SIGKILL a tiny export (--force over an existing bundle) at each named step and once by time:
the bundle at --out always verifies and answers; the next export removes every leftover.
Then: a reader polling a real bundle during 20 replacements always finds it verifiable."""

from __future__ import annotations

import threading
import time

import pytest
from fault_harness import KILLED, leftovers, run_killed

from fmvr import atomic

pytestmark = pytest.mark.slow
EXPORT = ["-m", "export", "--demo-tiny", "--quant", "fp32", "--force", "--out"]
POINTS = ["export.after-vision", "export.after-llm", "atomic.before-swap", "atomic.after-swap"]


def answers(bundle) -> None:
    from PIL import Image

    from runtime.bundle import verify_bundle
    from runtime.pipeline import Pipeline

    verify_bundle(bundle)
    res = Pipeline.load(bundle).ask(
        Image.new("RGB", (64, 64), "red"), "What is it?", tokens=9, max_new_tokens=2
    )
    assert res.token_ids and res.budget == 9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "b"
    rc, err = run_killed([*EXPORT, str(out)])
    assert rc == 0, err
    return out


def test_kills_at_named_steps_leave_a_bundle_and_the_next_export_cleans_up(bundle):
    for point in POINTS:
        rc, err = run_killed([*EXPORT, str(bundle)], fault=point)
        assert rc == KILLED and f"fault point {point}" in err, err[-2000:]
        answers(bundle)
    before = (bundle / "manifest.json").read_bytes()  # after-swap: the new bundle is already in place
    rc, _ = run_killed([*EXPORT, str(bundle)], after_s=8.0)  # by time: somewhere in the run
    answers(bundle)
    assert (
        bundle / "manifest.json"
    ).read_bytes() == before or rc == 0  # still the old one unless it finished
    assert leftovers(bundle), "the kills left nothing: the test would not show the sweep"
    rc, err = run_killed([*EXPORT, str(bundle)])
    assert rc == 0, err[-2000:]
    assert "freed" in err
    assert leftovers(bundle) == []
    answers(bundle)


def test_a_reader_always_finds_a_verifiable_bundle_during_20_replacements(bundle, tmp_path):
    """The same bundle content (a re-export) replaced 20 times while a reader verifies it."""
    import shutil

    from runtime.bundle import atomic_bundle, verify_bundle

    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    ok, failures, stop = [0], [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                verify_bundle(target)
                ok[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e))

    reader = threading.Thread(target=poll)
    reader.start()
    for _ in range(20):
        with atomic_bundle(target, force=True) as tmp:
            shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        time.sleep(0.01)
    stop.set()
    reader.join()
    assert failures == [], failures[:3]
    assert ok[0] > 20 and leftovers(target) == []
    assert atomic.exchange  # the one-step swap was available here (see fmvr.atomic)
