"""Command-line helpers shared by every entry point (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence


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
