"""AskOptions: everything a caller may ask of one answer, typed and checked in one place.

The CLI (`python -m runtime ask` flags), the server (the chat request's JSON fields) and the
Python API (`pipe.ask(image, prompt, latency_ms=120)`: keyword arguments build the options)
all produce one `AskOptions`, and the pipeline reads only that. Standard library only.

    latency_ms      the latency budget: the largest visual-token budget predicted to fit it
    tokens          force a visual-token budget instead (the policy is skipped): one int for
                    every image, or a list with one budget per image (in order; stored as a tuple)
    objective       what must fit latency_ms: "ttft" (time to first token) or "total"
    strict          no budget fits latency_ms -> DeadlineError (else the smallest, marked missed)
    max_new_tokens, temperature, top_p, seed, stop    sampling and stop strings
    timeout_s       stop decoding after this many seconds (GenerationTimeout)
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

OBJECTIVES = ("ttft", "total")
MAX_SEED = 2**63 - 1
# Names callers reach for that mean one of ours (other APIs' spellings): said in the error.
_SPELLINGS = {
    "latency_budget_ms": "latency_ms",
    "deadline_ms": "latency_ms",
    "deadline": "latency_ms",
    "visual_tokens": "tokens",
    "budget": "tokens",
    "max_tokens": "max_new_tokens",
    "timeout": "timeout_s",
}


class OptionsError(ValueError):
    """One option's value is invalid: `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise OptionsError(name, f"must be a finite number, got {v!r}")
    return float(v)


def _integer(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise OptionsError(name, f"must be an integer, got {v!r}")
    return int(v)


@dataclass(frozen=True, kw_only=True)
class AskOptions:
    latency_ms: float | None = None
    tokens: int | tuple[int, ...] | None = None  # one budget for every image, or one per image
    objective: str = "ttft"
    strict: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        """Check every field; numbers are stored as float/int and stop strings as a tuple, so
        equal requests give equal options whichever front end built them."""
        put = object.__setattr__  # frozen: normalise in place once, here
        if self.latency_ms is not None:
            put(self, "latency_ms", _number("latency_ms", self.latency_ms))
            if self.latency_ms <= 0:
                raise OptionsError("latency_ms", f"must be > 0 ms, got {self.latency_ms:g}")
        if self.tokens is not None:
            put(self, "tokens", _tokens(self.tokens))
        if self.objective not in OBJECTIVES:
            raise OptionsError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.strict, bool):
            raise OptionsError("strict", f"must be true or false, got {self.strict!r}")
        put(self, "max_new_tokens", _integer("max_new_tokens", self.max_new_tokens))
        if self.max_new_tokens < 1:
            raise OptionsError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        put(self, "temperature", _number("temperature", self.temperature))
        if self.temperature < 0:
            raise OptionsError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature:g}")
        put(self, "top_p", _number("top_p", self.top_p))
        if not 0 < self.top_p <= 1:
            raise OptionsError("top_p", f"must be in (0, 1], got {self.top_p:g}")
        if self.seed is not None:
            put(self, "seed", _integer("seed", self.seed))
            if not 0 <= self.seed <= MAX_SEED:
                raise OptionsError("seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        put(self, "stop", _stops(self.stop))
        if self.timeout_s is not None:
            put(self, "timeout_s", _number("timeout_s", self.timeout_s))
            if self.timeout_s < 0:
                raise OptionsError("timeout_s", f"must be >= 0 s, got {self.timeout_s:g}")

    @classmethod
    def of(cls, options: AskOptions | None = None, **kw: Any) -> AskOptions:
        """`options` (default: all defaults) with the keyword arguments `kw` replacing fields.

        An unknown keyword is a TypeError naming the valid ones (and ours, for another API's
        spelling such as visual_tokens)."""
        if options is not None and not isinstance(options, AskOptions):
            raise TypeError(
                f"options must be an AskOptions, got {type(options).__name__} {options!r}; pass "
                "latency_ms=..., tokens=... etc. by keyword"
            )
        unknown = sorted(set(kw) - set(NAMES))
        if unknown:
            raise TypeError(_unknown_message(unknown))
        base = options if options is not None else cls()
        return replace(base, **kw) if kw else base


NAMES = tuple(f.name for f in fields(AskOptions))


def _tokens(v: Any) -> int | tuple[int, ...]:
    """A budget >= 1 (int), or a non-empty list of them (-> tuple)."""
    many = isinstance(v, (list, tuple))
    values = list(v) if many else [v]
    if many and not values:
        raise OptionsError("tokens", "must be a visual-token budget or a non-empty list of them, got []")
    out = [_integer("tokens", t) for t in values]
    bad = [t for t in out if t < 1]
    if bad:
        raise OptionsError("tokens", f"must be a visual-token budget >= 1, got {bad[0]}")
    return tuple(out) if many else out[0]


def _stops(stop: Any) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise OptionsError("stop", f"must be a string or a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def _unknown_message(unknown: list[str]) -> str:
    hints = []
    for name in unknown:
        ours = _SPELLINGS.get(name) or next(iter(difflib.get_close_matches(name, NAMES, n=1)), None)
        hints.append(f"{name} (did you mean {ours}?)" if ours else name)
    return f"unknown option(s) {', '.join(hints)}; the options are: {', '.join(NAMES)}"


def at_budget(opts: AskOptions, tokens: int | None, where: str) -> AskOptions:
    """`opts` for an answer at given budget(s): a latency budget or strict cannot apply there."""
    for name in ("latency_ms", "strict") + (("tokens",) if tokens is None else ()):
        if getattr(opts, name) not in (None, False):
            raise OptionsError(name, f"does not apply to {where}: it answers at the budgets it is given")
    return opts if tokens is None else replace(opts, tokens=tokens)
