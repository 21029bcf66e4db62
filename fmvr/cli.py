"""Command-line helpers shared by every entry point (torch-free).

Renamed flags: an old spelling keeps working for one release. `renamed_flags` rewrites it to
the new one before argparse sees it and warns (FutureWarning, shown by default) naming the
new spelling; `--help` lists only the new names.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence


def renamed_flags(argv: Sequence[str] | None, renames: Mapping[str, str]) -> list[str]:
    """`argv` (default: sys.argv[1:]) with every old flag in `renames` replaced by its new name.

    `--old value` and `--old=value` are both rewritten; everything after a bare `--` is left alone.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        if flag in renames:
            new = renames[flag]
            warnings.warn(
                f"{flag} is deprecated and will be removed in the next release; use {new}",
                FutureWarning,
                stacklevel=2,
            )
            arg = new + eq + value
        out.append(arg)
    return out
