"""The budget policy: the largest visual-token budget whose predicted time fits the deadline.

Prediction per stage, from the device's profile (medians of an uncontended run):
    preprocess  profile.preprocess_ms (or the time this request already spent on it)
    vision      profile.vision_ms[T].p50
    prefill     intercept + ms_per_token * (text tokens + T)
    decode      decode_ms_per_token * max_new_tokens
times a correction learned online: the `quantile` (default p95) of measured / profiled time
over the last `window` requests, kept separately for the time to first token (vision +
prefill) and for decoding, and per load level: the number of other requests in flight on
the same pipeline when this one started (0, 1, 2, 3+). A median prediction misses half of
its deadlines and an uncontended one misses most of them under load; a high quantile per
load level keeps the promise the caller asked for. Until a level has MIN_SAMPLES
observations it borrows the nearest lower level's, scaled by processor sharing ((1 + load)
/ (1 + that level): k requests sharing a saturated device each run k times slower).

    ttft  = preprocess + vision + prefill        (objective "ttft", the default)
    total = ttft + decode                         (objective "total")

Several images (N > 1, the last one the newest): preprocess and vision are summed over the
images (profile.vision_ms is per image at batch 1, so a batched pass that beats N single ones
makes the prediction conservative until the correction learns it) and prefill is by the total
prompt length (text + every image's tokens). The candidates are a ladder, most expensive first:
the newest image at budget b with the others at b too, then the others one level smaller:
    (576 x N), (144 x N-1, 576), (144 x N), (36 x N-1, 144), ..., (1 x N-1, 9), (1 x N)
"newest largest, the others equal or one level smaller"; the first that fits is chosen, and
when none does, all-smallest with deadline_met=False (or DeadlineError with strict).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.options import OBJECTIVES
from runtime.profile import Profile

QUANTILE = 0.95  # the fraction of deadlines a prediction is meant to keep
WINDOW = 64  # recent observations kept per part and load level (old ones age out: drift)
MIN_SAMPLES = 8  # observations before a load level trusts its own quantile
MAX_LOAD = 3  # loads of 3 or more other requests share one level
RATIO_CLIP = (0.1, 20.0)  # bounds of one observation's measured / profiled ratio
PARTS = {"ttft": ("vision", "prefill"), "decode": ("decode",)}  # corrected together


class DeadlineError(RuntimeError):
    """strict=True and no budget fits the latency budget (the deadline)."""


@dataclass(frozen=True)
class Prediction:
    budget: int  # the newest (last) image's
    stages: dict[str, float]  # ms per stage (corrected)
    budgets: tuple[int, ...] = ()  # per image, in order (filled with (budget,) for one image)

    def __post_init__(self) -> None:
        _per_image(self)

    @property
    def ttft_ms(self) -> float:
        return self.stages["preprocess"] + self.stages["vision"] + self.stages["prefill"]

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + self.stages["decode"]

    def time(self, objective: str) -> float:
        return self.ttft_ms if objective == "ttft" else self.total_ms


@dataclass(frozen=True)
class Choice:
    budget: int  # the newest (last) image's budget
    prediction: Prediction | None
    deadline_met: bool | None  # predicted; None when no deadline was given
    reason: str
    # predicted ms per candidate: budget -> ms for one image, "b1,b2,...,bN" (per image) -> ms for N
    candidates: dict[int | str, float] = field(default_factory=dict)
    budgets: tuple[int, ...] = ()  # per image, in order (filled with (budget,) for one image)

    def __post_init__(self) -> None:
        _per_image(self)


def _per_image(x: Prediction | Choice) -> None:
    """Fill `budgets` with (budget,) when not given; the last one must be `budget`."""
    object.__setattr__(x, "budgets", tuple(x.budgets) or (x.budget,))  # frozen: set once, here
    if x.budgets[-1] != x.budget:
        raise ValueError(f"budget {x.budget} must be the last (newest) image's of budgets {x.budgets}")


def ladder(budgets: Sequence[int], images: int) -> list[tuple[int, ...]]:
    """Per-image budget combinations, most expensive first (see the module docstring): the newest
    (last) image at each budget b, the others at b, then at the next smaller budget."""
    bs = sorted(budgets, reverse=True)
    if images == 1:
        return [(b,) for b in bs]
    out = []
    for b, smaller in zip(bs, [*bs[1:], None]):
        out.append((b,) * images)
        if smaller is not None:
            out.append((smaller,) * (images - 1) + (b,))
    return out


def label(budgets: Sequence[int]) -> int | str:
    """A candidate's key: the budget for one image, "b1,b2,...,bN" for several."""
    return budgets[0] if len(budgets) == 1 else ",".join(map(str, budgets))


class Policy:
    """Chooses budgets from a profile; `observe` feeds measured stage times back (thread-safe)."""

    def __init__(
        self, profile: Profile, budgets: Sequence[int], quantile: float = QUANTILE, window: int = WINDOW
    ) -> None:
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        if window < MIN_SAMPLES:
            raise ValueError(f"window must be >= {MIN_SAMPLES}, got {window}")
        self.profile = profile
        self.budgets = tuple(sorted(budgets, reverse=True))
        self.quantile = quantile
        self._seen = {part: [deque[float](maxlen=window) for _ in range(MAX_LOAD + 1)] for part in PARTS}
        self._lock = threading.Lock()

    def raw(
        self,
        budget: int | Sequence[int],
        text_tokens: int,
        max_new_tokens: int,
        cached_suffix: int | None = None,
    ) -> dict[str, float]:
        """Profiled ms per stage, uncorrected; `budget`: one image's, or one per image.
        `cached_suffix`: the image's prompt prefix is in the prefix cache (runtime.prefix_cache):
        no vision pass, and only these text tokens after the image prefilled."""
        p, budgets = self.profile, _budgets(budget)
        return {
            "preprocess": p.preprocess_ms * len(budgets),
            "vision": 0.0 if cached_suffix is not None else sum(p.vision(t) for t in budgets),
            "prefill": p.prefill(cached_suffix if cached_suffix is not None else text_tokens + sum(budgets)),
            "decode": p.decode_ms_per_token * max_new_tokens,
        }

    def ratio(self, part: str, load: int = 0) -> float:
        """The correction of `part` ("ttft" or "decode") at `load` other requests in flight."""
        level = min(max(load, 0), MAX_LOAD)
        with self._lock:
            for lv in range(level, -1, -1):
                seen = self._seen[part][lv]
                if len(seen) >= MIN_SAMPLES:
                    return (
                        float(np.quantile(np.fromiter(seen, float), self.quantile)) * (1 + level) / (1 + lv)
                    )
        return float(1 + level)  # nothing observed yet: the profile, shared by processor sharing

    def predict(
        self,
        budget: int | Sequence[int],
        text_tokens: int,
        max_new_tokens: int,
        spent_ms: float | None = None,
        load: int = 0,
        cached_suffix: int | None = None,
    ) -> Prediction:
        """Corrected ms per stage for one image at `budget`, or one image per budget in a list
        (the last the newest); `spent_ms`: time this request already spent (preprocessing, a
        queue), used as is; `load`: other requests in flight on this device; `cached_suffix`:
        see `raw`."""
        budgets = _budgets(budget)
        raw = self.raw(budgets, text_tokens, max_new_tokens, cached_suffix)
        stages = dict(raw)
        for part, names in PARTS.items():
            r = self.ratio(part, load)
            for name in names:
                stages[name] = raw[name] * r
        if spent_ms is not None:
            stages["preprocess"] = spent_ms
        return Prediction(budgets[-1], stages, budgets)

    def choose(
        self,
        latency_ms: float | None,
        text_tokens: int,
        max_new_tokens: int,
        objective: str = "ttft",
        strict: bool = False,
        spent_ms: float | None = None,
        load: int = 0,
        images: int = 1,
        cached: Mapping[int, int] | None = None,
    ) -> Choice:
        """The first candidate of the ladder predicted to fit (for one image: the largest budget);
        else all-smallest (deadline_met=False) or DeadlineError.

        `spent_ms`: time already spent on this request (preprocessing, queueing), counted as
        measured; `load`: other requests in flight on this device; `images`: how many images the
        prompt holds (the last the newest); `cached`: {budget: text tokens after the image} for the
        budgets whose prompt prefix this frame already has in the prefix cache (one image): they
        are predicted without a vision pass and with only that text prefilled, so a cached 576 may
        fit a deadline an uncached 36 would not.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        steps = ladder(self.budgets, images)
        hits = dict(cached or {}) if images == 1 else {}
        preds = [self.predict(c, text_tokens, max_new_tokens, spent_ms, load, hits.get(c[-1])) for c in steps]
        times = {label(c): round(p.time(objective), 3) for c, p in zip(steps, preds)}
        if latency_ms is None:
            return _choice(preds[0], None, "no latency budget given: the largest budget", times)
        q = f"p{round(self.quantile * 100):d}"
        busy = f", {load} other request(s) in flight" if load else ""
        what = "budget" if images == 1 else f"per-image budgets for {images} images (newest last)"
        for c, p in zip(steps, preds):  # most expensive first
            ms = times[label(c)]
            if ms <= latency_ms:
                why = f"largest {what} whose {q} {objective} {ms:.1f} ms fits {latency_ms:g} ms{busy}"
                if c[-1] in hits:
                    why += " (this frame's prefix is cached: no vision pass, only the question prefilled)"
                return _choice(p, True, why + _which(c), times)
        last = steps[-1]
        why = (
            f"no budget fits {latency_ms:g} ms{busy}: the smallest ({label(last)}) is predicted at "
            f"{times[label(last)]:.1f} ms {objective} ({q})"
        )
        if strict:
            raise DeadlineError(why + "; raise the latency budget or drop strict")
        return _choice(preds[-1], False, why + ": serving it anyway", times)

    def observe(
        self,
        budget: int | Sequence[int],
        text_tokens: int,
        decoded_tokens: int,
        measured: dict[str, float],
        load: int = 0,
    ) -> None:
        """Record one request's measured / profiled ratios (ttft part and decode) at its load;
        `budget`: its image's, or one per image."""
        raw = self.raw(budget, text_tokens, decoded_tokens)
        level = min(max(load, 0), MAX_LOAD)
        with self._lock:
            for part, names in PARTS.items():
                if not all(n in measured for n in names):
                    continue
                expected = sum(raw[n] for n in names)
                if expected <= 1e-9:
                    continue
                ratio = sum(measured[n] for n in names) / expected
                self._seen[part][level].append(min(max(ratio, RATIO_CLIP[0]), RATIO_CLIP[1]))

    def corrections(self, load: int = 0) -> dict[str, float]:
        """The current correction per part at `load` (1.0: the profile as measured)."""
        return {part: self.ratio(part, load) for part in PARTS}


def _budgets(budget: int | Sequence[int]) -> tuple[int, ...]:
    return (budget,) if isinstance(budget, int) else tuple(budget)


def _choice(p: Prediction, met: bool | None, why: str, times: dict[int | str, float]) -> Choice:
    return Choice(p.budget, p, met, why, times, p.budgets)


def _which(budgets: tuple[int, ...]) -> str:
    """': newest 144, others 36' for several images ('' for one)."""
    if len(budgets) == 1:
        return ""
    others = sorted(set(budgets[:-1]))
    return f": newest {budgets[-1]}, others {','.join(map(str, others))}"
