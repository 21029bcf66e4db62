"""Atomic writes, one behaviour for every writer: readers see the old file (or folder) or the
new one, never a half-written one, and the old one survives any failure.

Torch-free (the runtime uses it too). Files: written to a temp file beside the target, then
`os.replace`d over it. Folders: built in a temp folder beside the target, then swapped in with
two renames; if the second rename fails the old folder is put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block succeeds it replaces `path`
    (an existing `path` is replaced: the caller decides whether that is allowed). On any error
    the temp folder is removed and `path` is untouched."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.partial-", dir=p.parent))
    try:
        yield tmp
        swap_into_place(tmp, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename folder `tmp` to `path`; an existing `path` is moved aside first and put back if
    the rename fails, then deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, aside / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside / path.name, path)  # the previous copy comes back, then the failure is reported
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
