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


def parse_tokens(text: str, valid: Sequence[int], flag: str = "--tokens") -> tuple[int, ...]:
    """A budget list as typed on a command line ("36,9", "36" or "all"/"" for every valid
    budget) -> budgets in the model's order (largest first), each checked against `valid`."""
    if text.strip() in ("", "all"):
        return tuple(valid)
    try:
        chosen = {int(t) for t in text.split(",")}
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers such as 36,9, or all") from None
    bad = sorted(chosen - set(valid), reverse=True)
    if bad:
        raise ValueError(f"{flag}: {bad} are not budgets of this model (valid: {', '.join(map(str, valid))})")
    return tuple(t for t in valid if t in chosen)
