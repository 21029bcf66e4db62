"""Run a command in a subprocess and SIGKILL it at a chosen point: at a named fault point the
code announces (FMVR_FAULT=<name>[@N]: fmvr.staging.fault_point kills the process itself, so
the moment is exact) or after a time. Returns the exit code (-9 when killed) and stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL


def run_killed(
    args: list[str],
    *,
    fault: str | None = None,
    after_s: float | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> tuple[int, str]:
    """`python *args` from the repository root; killed at `fault` or `after_s` seconds in."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("FMVR_FAULT", None)
    if fault:
        full_env["FMVR_FAULT"] = fault
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if after_s is not None:
        try:
            proc.wait(after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def leftovers(target: Path) -> list[str]:
    """Everything beside `target` but `target` itself (staging, old or version folders)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def wait_for(pred, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.05)
