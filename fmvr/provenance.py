"""Which code made a result: every result file and training run records this, and a cached
run is reused only when its `source_sha256` matches the code about to use it (torch-free).

    code_version() -> {"commit": "1a2b3c4..." | None, "dirty": bool | None, "source_sha256": "..."}

`source_sha256` hashes the Python sources of the packages and scripts (paths and bytes), so it
changes with any edit, committed or not, and is the same in a clean clone of the same commit.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fmvr", "train", "export", "runtime", "benchmarks", "scripts")


def source_sha256(paths: Sequence[str] = SOURCES, root: Path = ROOT) -> str:
    """sha256 over the Python files under each path (a folder, or one file), with their names."""
    h = hashlib.sha256()
    for name in paths:
        top = root / name
        if not top.exists():  # an installed package holds only some of the folders (a Jetson's runtime)
            h.update(f"{name}: absent\0".encode())
            continue
        for path in sorted(top.rglob("*.py")) if top.is_dir() else [top]:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, str | bool | None]:
    commit = _git("rev-parse", "HEAD")
    # dirty = an edited or new Python source (what source_sha256 hashes), not a result file beside it
    status = (
        _git("status", "--porcelain", "--", *(f":(glob){d}/**/*.py" for d in SOURCES)) if commit else None
    )
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "source_sha256": source_sha256(),
    }


def _cpuinfo(cpuinfo: Path) -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (the first processor's), lower-case keys."""
    out: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out.setdefault(key.strip().lower(), value.strip())
    return out


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo"), info: dict[str, str] | None = None) -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform elsewhere)."""
    info = _cpuinfo(cpuinfo) if info is None else info
    for key in ("model name", "hardware", "cpu model"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine() or "unknown-cpu"


# CPU features that change this project's timings: bf16/int8 matrix units (training autocast,
# onnxruntime's int8 kernels) and AVX-512.
TIMING_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """{"cpu": model name, "logical_cpus": n this process may use, "cpu_flags": the TIMING_FLAGS it has}: timings
    compare only between records of the same machine (two "Intel Xeon" can differ in AMX)."""
    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    return {
        "cpu": cpu_model(info=info),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": [f for f in TIMING_FLAGS if f in flags],
    }


def run_record(argv: Sequence[str] | None = None) -> dict:
    """{"code": code_version(), "command": the command line, "created": UTC time, "machine": machine()}."""
    args = list(sys.argv if argv is None else argv)
    return {
        "code": code_version(),
        "command": shlex.join(["python", *args]) if args else "",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
