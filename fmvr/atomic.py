"""Atomic writes, one behaviour for every writer: readers see the old file (or folder) or the
new one, never a half-written one, never nothing, and the old one survives any failure.

Torch-free (the runtime uses it too). Files: written to a temp file beside the target, then
`os.replace`d over it. Folders: built in a staging folder beside the target (fmvr.staging:
named after its owner, stale ones of killed writers swept first), then put in place in one
step: a new path is one `rename`; an existing folder is swapped with the staging folder by
one `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), so a reader
of the path finds the old folder or the new one at every instant, and a kill at any point
leaves one of them there. The old folder, now in the staging folder, is then deleted (a kill
there: the next writer's sweep deletes it). Where the exchange is unsupported (other OSes,
some filesystems) the old folder is renamed aside and the new one renamed in: the path is
missing for the microseconds between the two renames, and a kill there leaves the old folder
in `.<name>.old-*`, which the next writer's sweep puts back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fmvr import staging
from fmvr.staging import fault_point


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """`open(path, mode)` whose result appears only when the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with open_atomic(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, data: Any, indent: int = 2, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, need: int | None = None, what: str = "this write") -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block succeeds it replaces `path`
    (an existing `path` is replaced: the caller decides whether that is allowed). On any error,
    Ctrl-C or SIGTERM the staging folder is removed and `path` is untouched.

    need: the bytes the block will write; refused (staging.NotEnoughSpace) before staging when
    they do not fit with the margin (after stale staging folders were swept)."""
    p = Path(path)
    staging.sweep(p)
    if need is not None:
        staging.check_space(p, need, what)
    with staging.terminate_as_exception():
        tmp = staging.make_staging(p)
        try:
            yield tmp
            fault_point("atomic.before-swap")
            swap_into_place(tmp, p)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def update_dir(
    path: str | Path, skip: tuple[str, ...] = (), need: int = 0, what: str = "this update"
) -> Iterator[Path]:
    """atomic_dir for changing some files of an existing folder: the staging folder starts as a
    copy of `path` (hard links, so no space; a copy where links are unsupported), except the
    top-level entries named in `skip` and hidden ones (other writers' debris). Writers must replace files (write a new file, rename it),
    never rewrite a linked file in place."""
    src = Path(path)
    with atomic_dir(src, need=need, what=what) as tmp:
        for entry in src.iterdir():
            if entry.name in skip or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, tmp / entry.name)
        yield tmp


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_into_place(tmp: Path, path: Path) -> None:
    """Put folder `tmp` at `path` in one step; an existing `path` ends up deleted. A failure
    leaves `path` as it was."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if exchange(tmp, path):  # tmp now holds the old folder
        fault_point("atomic.after-swap")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = staging.make_staging(path, "old")
    try:
        os.replace(path, aside / path.name)
        fault_point("atomic.aside")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside / path.name, path)  # the previous copy comes back, then the failure is reported
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries `a` and `b` atomically (Linux renameat2); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


_libc_fn: Any = False


def _renameat2() -> Any:
    global _libc_fn
    if _libc_fn is False:
        _libc_fn = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _libc_fn = fn
    return _libc_fn
