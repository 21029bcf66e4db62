"""What a request produces: the vision pass, the Result, and the streaming Answer that owns
its generator (runtime.pipeline makes them)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.options import AskOptions
from runtime.policy import Choice


@dataclass
class VisionPass:
    """One image through the vision backend: visual tokens per budget (batch 1)."""

    features: dict[int, np.ndarray]  # T -> [T, D]
    preprocess_ms: float
    vision_ms: float
    backend: str


@dataclass
class Result:
    answer: str
    token_ids: list[int]
    budget: int
    backend: str
    llm_provider: str
    finish_reason: str
    prompt_tokens: int  # text + visual tokens
    latency_ms: float | None
    objective: str
    deadline_met: bool | None  # measured against latency_ms (None: no deadline)
    predicted_deadline_met: bool | None
    reason: str
    candidates_ms: dict[int, float] = field(default_factory=dict)  # budget -> predicted objective time
    predicted_ms: dict[str, float] = field(default_factory=dict)
    measured_ms: dict[str, float] = field(default_factory=dict)
    vision_reused: bool = False
    load: int = 0  # other requests in flight on this pipeline when this one started

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One request as it runs: what was asked, the vision pass, and the budget chosen."""

    vp: VisionPass
    ids: list[int]  # the rendered prompt, one image placeholder
    choice: Choice
    opts: AskOptions
    t_start: float  # perf_counter when the request began
    reused: bool = False  # the vision pass was charged to an earlier answer
    load: int = 0  # other requests in flight when it started
    waited_ms: float = 0.0  # spent before the pipeline saw it (a server's queue)


class Answer:
    """A streaming answer: iterate for text deltas; `.result` once exhausted.

    It owns its generator, which yields the deltas and returns the Result; `close()` stops
    decoding early. `options` and `budget` are known before the first delta."""

    def __init__(
        self,
        run: Generator[str, None, Result],
        options: AskOptions,
        budget: int,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self.options, self.budget = options, budget
        self.result: Result | None = None
        self._on_done = on_done  # called once: exhausted, closed or dropped

    def __iter__(self) -> Iterator[str]:
        if self.result is None:
            try:
                self.result = yield from self._run
            finally:
                self._done()

    def close(self) -> None:
        self._run.close()
        self._done()

    def __del__(self) -> None:
        self._done()

    def _done(self) -> None:
        done, self._on_done = self._on_done, None
        if done is not None:
            done()
