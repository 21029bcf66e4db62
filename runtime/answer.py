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
    """The images of a request through the vision backend: for one image, its visual tokens per
    budget (`features`, what escalation re-answers from); for a request, each image's visual
    tokens at its chosen budget (`images`, in prompt order)."""

    features: dict[int, np.ndarray]  # T -> [T, D] (one image)
    preprocess_ms: float  # all images
    vision_ms: float  # all backend calls
    backend: str
    images: list[np.ndarray] = field(default_factory=list)  # [T_i, D] per image, in order
    calls: int = 1  # backend calls (images sharing an input shape share a batched call)


@dataclass
class Result:
    answer: str
    token_ids: list[int]
    budget: int  # the newest (last) image's budget; every image's: `budgets`
    backend: str
    llm_provider: str
    finish_reason: str
    prompt_tokens: int  # text + every image's visual tokens
    latency_ms: float | None
    objective: str
    deadline_met: bool | None  # measured against latency_ms (None: no deadline)
    predicted_deadline_met: bool | None
    reason: str
    # predicted objective time per candidate: budget -> ms (one image), "b1,...,bN" -> ms (N images)
    candidates_ms: dict[int | str, float] = field(default_factory=dict)
    predicted_ms: dict[str, float] = field(default_factory=dict)
    measured_ms: dict[str, float] = field(default_factory=dict)
    vision_reused: bool = False
    prefix_reused: int = 0  # prompt positions whose KV state came from the prefix cache (0: none)
    load: int = 0  # other requests in flight on this pipeline when this one started
    budgets: list[int] = field(default_factory=list)  # per image in prompt order; the last is `budget`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One request as it runs: what was asked, the vision pass, and the budget chosen."""

    vp: VisionPass
    ids: list[int]  # the rendered prompt, one placeholder per image (not yet expanded)
    choice: Choice
    opts: AskOptions
    t_start: float  # perf_counter when the request began
    reused: bool = False  # the vision pass was charged to an earlier answer
    load: int = 0  # other requests in flight when it started
    waited_ms: float = 0.0  # spent before the pipeline saw it (a server's queue)
    prefix: Any = None  # runtime.prefix_cache.PrefixEntry of this frame and budget (a hit), or None
    prefix_key: str | None = None  # its key: a miss saves the prefix under it after the prefill

    @property
    def text_tokens(self) -> int:
        """Prompt tokens less the image placeholders."""
        return len(self.ids) - len(self.choice.budgets)


def measured_ms(req: Request, gen: Any, t_end: float) -> dict[str, float]:
    """What `req` took per stage (gen: its runtime.llm.Generation; t_end: perf_counter at the end)."""
    vp = req.vp
    pre, vis = (0.0, 0.0) if req.reused else (vp.preprocess_ms, vp.vision_ms)
    return {
        "waited": req.waited_ms,
        "preprocess": pre,
        "vision": vis,
        "prefill": gen.prefill_ms,
        "decode": gen.decode_ms,
        "ttft": req.waited_ms + pre + vis + gen.prefill_ms,
        "total": req.waited_ms + (t_end - req.t_start) * 1e3,
    }


def build_result(
    req: Request, gen: Any, answer: str, measured: dict[str, float], llm_provider: str
) -> Result:
    """The Result of `req`, decoded by `gen` (a runtime.llm.Generation) into `answer`."""
    choice, opts = req.choice, req.opts
    pred = choice.prediction
    predicted = {**pred.stages, "ttft": pred.ttft_ms, "total": pred.total_ms} if pred else {}
    met = None if opts.latency_ms is None else measured[opts.objective] <= opts.latency_ms
    return Result(
        answer=answer,
        token_ids=list(gen.tokens),
        budget=choice.budget,
        backend=req.vp.backend,
        llm_provider=llm_provider,
        finish_reason=gen.finish_reason or "stop",
        prompt_tokens=req.text_tokens + sum(choice.budgets),
        latency_ms=opts.latency_ms,
        objective=opts.objective,
        deadline_met=met,
        predicted_deadline_met=choice.deadline_met,
        reason=choice.reason,
        candidates_ms=dict(choice.candidates),
        predicted_ms={k: round(v, 3) for k, v in predicted.items()},
        measured_ms={k: round(v, 3) for k, v in measured.items()},
        vision_reused=req.reused or req.prefix is not None,
        prefix_reused=getattr(gen, "reused_prefix", 0),
        load=req.load,
        budgets=list(choice.budgets),
    )


class Answer:
    """A streaming answer: iterate for text deltas; `.result` once exhausted.

    It owns its generator, which yields the deltas and returns the Result; `close()` stops
    decoding early. `options`, `budget` (the newest image's) and `budgets` (every image's, in
    order) are known before the first delta."""

    def __init__(
        self,
        run: Generator[str, None, Result],
        options: AskOptions,
        budget: int,
        on_done: Callable[[], None] | None = None,
        budgets: tuple[int, ...] = (),
    ) -> None:
        self._run = run
        self.options, self.budget, self.budgets = options, budget, budgets or (budget,)
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
