"""The budget policy: the largest visual-token budget whose predicted time fits the deadline.

Prediction per stage, from the device's profile:
    preprocess  profile.preprocess_ms
    vision      profile.vision_ms[T].p50
    prefill     intercept + ms_per_token * (text tokens + T)
    decode      decode_ms_per_token * max_new_tokens
times an online correction per stage: an EWMA of measured / profiled time over the
requests served so far (so a device that got slower - thermal throttling, another process -
moves the choice down, and one that got faster moves it back up).

    ttft  = preprocess + vision + prefill        (objective "ttft", the default)
    total = ttft + decode                         (objective "total")
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.options import OBJECTIVES
from runtime.profile import STAGES, Profile

RATIO_CLIP = (0.25, 4.0)  # bounds of one observation's measured / profiled ratio


class DeadlineError(RuntimeError):
    """strict=True and no budget fits the latency budget (the deadline)."""


@dataclass(frozen=True)
class Prediction:
    budget: int
    stages: dict[str, float]  # ms per stage (corrected)

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
    budget: int
    prediction: Prediction | None
    deadline_met: bool | None  # predicted; None when no deadline was given
    reason: str
    candidates: dict[int, float] = field(default_factory=dict)  # budget -> predicted ms


class Policy:
    """Chooses budgets from a profile; `observe` feeds measured stage times back (thread-safe)."""

    def __init__(self, profile: Profile, budgets: Sequence[int], alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.profile = profile
        self.budgets = tuple(sorted(budgets, reverse=True))
        self.alpha = alpha
        self.correction = dict.fromkeys(STAGES, 1.0)
        self._lock = threading.Lock()

    def raw(self, budget: int, text_tokens: int, max_new_tokens: int) -> dict[str, float]:
        """Profiled ms per stage, uncorrected."""
        p = self.profile
        return {
            "preprocess": p.preprocess_ms,
            "vision": p.vision(budget),
            "prefill": p.prefill(text_tokens + budget),
            "decode": p.decode_ms_per_token * max_new_tokens,
        }

    def predict(
        self, budget: int, text_tokens: int, max_new_tokens: int, spent_ms: float | None = None
    ) -> Prediction:
        """Corrected ms per stage; `spent_ms`: preprocessing already done and timed (used as is)."""
        raw = self.raw(budget, text_tokens, max_new_tokens)
        with self._lock:
            stages = {s: raw[s] * self.correction[s] for s in STAGES}
        if spent_ms is not None:
            stages["preprocess"] = spent_ms
        return Prediction(budget, stages)

    def choose(
        self,
        latency_ms: float | None,
        text_tokens: int,
        max_new_tokens: int,
        objective: str = "ttft",
        strict: bool = False,
        spent_ms: float | None = None,
    ) -> Choice:
        """Largest budget predicted to fit; else the smallest (deadline_met=False) or DeadlineError.

        `spent_ms`: time already spent on this request (preprocessing), counted as measured.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        preds = {t: self.predict(t, text_tokens, max_new_tokens, spent_ms) for t in self.budgets}
        times = {t: round(p.time(objective), 3) for t, p in preds.items()}
        if latency_ms is None:
            t = self.budgets[0]
            return Choice(t, preds[t], None, "no latency budget given: the largest budget", times)
        for t in self.budgets:  # largest first
            if times[t] <= latency_ms:
                why = f"largest budget whose predicted {objective} {times[t]:.1f} ms fits {latency_ms:g} ms"
                return Choice(t, preds[t], True, why, times)
        smallest = self.budgets[-1]
        why = (
            f"no budget fits {latency_ms:g} ms: the smallest ({smallest}) is predicted at "
            f"{times[smallest]:.1f} ms {objective}"
        )
        if strict:
            raise DeadlineError(why + "; raise the latency budget or drop strict")
        return Choice(smallest, preds[smallest], False, why + ": serving it anyway", times)

    def observe(self, budget: int, text_tokens: int, decoded_tokens: int, measured: dict[str, float]) -> None:
        """Update the EWMA correction of each measured stage from one request's timings."""
        raw = self.raw(budget, text_tokens, decoded_tokens)
        with self._lock:
            for stage in STAGES:
                if stage not in measured or raw[stage] <= 1e-9:
                    continue
                # clipped: one outlier (a page fault, a cold cache) must not swing the policy
                ratio = min(max(measured[stage] / raw[stage], RATIO_CLIP[0]), RATIO_CLIP[1])
                self.correction[stage] += self.alpha * (ratio - self.correction[stage])

    def corrections(self) -> dict[str, float]:
        with self._lock:
            return dict(self.correction)
