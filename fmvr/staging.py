"""Staging folders that clean up after the dead, a free-space check, and named fault points.

The rule every writer obeys (fmvr.atomic uses it; so do the export, checkpoint and cache
writers): before staging beside a target, it sweeps away the staging folders of owners that
are gone, says how much it freed, checks that its estimate fits in the free space, and only
then starts writing.

- Ownership: a staging folder's name carries its owner, `.<target>.partial-<pid>-<start>-<rand>`,
  where <start> is the process start time (field 22 of /proc/<pid>/stat; 0 where there is no
  /proc). An owner is alive while its pid exists with the same start time, so a reused pid does
  not keep a dead owner's folder. Folders of a live owner are never touched.
- Signals: while a folder is staged, SIGTERM raises SystemExit (like Ctrl-C raises
  KeyboardInterrupt), so the writer's `finally` removes its folder. SIGKILL cannot be caught:
  the next writer's sweep removes what it left.
- Free space: `check_space(path, need)` refuses with the path, the need and the free space when
  need * 1.1 + 64 MiB does not fit; `free_bytes` is the one query (monkeypatch it in tests).
- Fault points: `fault_point("export.after-vision")` kills the process with SIGKILL when
  FMVR_FAULT names that point ("name" or "name@N" for its N-th pass); otherwise it costs one
  environment lookup. tests/faults uses them to kill writers at chosen steps.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

MARGIN_FRACTION = 0.10
MARGIN_BYTES = 64 << 20
KINDS = ("partial", "old")  # staging folders, and (fallback swap only) old folders set aside
_OWNER = re.compile(r"-(\d+)-(\d+)-[0-9a-f]+$")


# ---- owners ------------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot) from /proc; 0 without /proc; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            return 0 if _pid_exists(pid) else None
        return None
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; comm may contain spaces


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{start_time(pid) or 0}"


def owner_alive(name: str) -> bool:
    """Whether the process that named this staging folder still runs (unparsable names: yes)."""
    m = _OWNER.search(name)
    if not m:
        return True  # not ours to judge: never removed
    pid, start = int(m.group(1)), int(m.group(2))
    now = start_time(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


def staging_name(target: Path, kind: str = "partial") -> Path:
    return target.parent / f".{target.name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}"


def make_staging(target: Path, kind: str = "partial") -> Path:
    """A new empty folder beside `target`, named after its owner (this process)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = staging_name(target, kind)
    path.mkdir()
    return path


# ---- sweeping ----------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def sweep(target: str | Path, quiet: bool = False) -> int:
    """Remove the staging folders of dead owners beside `target`; returns the bytes freed.

    A dead fallback swap (see fmvr.atomic) can have left the only copy of the old folder in
    `.<target>.old-*/<target>`: when `target` is missing it is put back first."""
    target = Path(target)
    if not target.parent.is_dir():
        return 0
    freed, removed = 0, 0
    for kind in KINDS:
        for stale in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            if owner_alive(stale.name):
                continue
            kept = stale / target.name
            if kind == "old" and kept.is_dir() and not os.path.lexists(target):
                os.replace(kept, target)
                print(f"[fmvr] put back {target} from an interrupted replacement", file=sys.stderr)
            freed += tree_bytes(stale)
            shutil.rmtree(stale, ignore_errors=True)
            removed += 1
    if removed and not quiet:
        print(
            f"[fmvr] removed {removed} stale staging folder(s) beside {target} "
            f"(left by killed writers), freed {human(freed)}",
            file=sys.stderr,
        )
    return freed


# ---- signals -----------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises SystemExit inside the block (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- free space --------------------------------------------------------------------------------


class NotEnoughSpace(OSError):
    """Refused before writing: the estimate (with margin) exceeds the free space."""


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_space(path: str | Path, need: int, what: str = "this write") -> None:
    """Refuse (NotEnoughSpace) when `need` bytes plus the margin do not fit beside `path`."""
    free = free_bytes(path)
    want = int(need * (1 + MARGIN_FRACTION)) + MARGIN_BYTES
    if want > free:
        raise NotEnoughSpace(
            f"not enough free space for {what} at {path}: needs about {human(need)} "
            f"(+{MARGIN_FRACTION:.0%} + {human(MARGIN_BYTES)} margin = {human(want)}), "
            f"{human(free)} free there. Free some space or write somewhere else; nothing was written."
        )


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# ---- fault points ------------------------------------------------------------------------------

_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when FMVR_FAULT is `name` (or `name@N`, at the N-th pass)."""
    want = os.environ.get("FMVR_FAULT")
    if not want or not want.startswith(name):
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        print(f"[fmvr] fault point {want}: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
