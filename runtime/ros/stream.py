"""Answering about a live camera: only the newest frame is answered, older ones are dropped.

    stream = FrameStream(pipe, latency_ms=120)
    stream.follow(camera_frames())          # a thread feeds frames from an iterator, or
    ros_callback = stream.put               # a ROS subscription / camera callback calls put()
    a = stream.ask("Is the door open?")     # on demand: the newest frame, now
    for a in stream.periodic("What is ahead?", rate_hz=2.0):   # or at a fixed rate
        print(a.result.answer, a.frame.stamp, a.age_ms, a.result.budget, a.dropped)

A camera delivers 15-60 frames a second and an answer takes longer than a frame, so a queue
of frames only grows stale (ros2_nanollm answers from a queue of 10). Here the mailbox holds
one frame: `put` replaces it and counts the one it drops; an answer takes the newest frame
not yet answered. Each answer carries its frame's stamp and sequence number, the frame's age
when the answer finished, the budget, predicted vs measured times (in `result`), and how many
frames were dropped so far. With `frame_age_counts=True` the frame's age when the question
starts counts against the latency budget (the deadline is then "an answer about a frame at
most latency_ms old"), else the deadline runs from the question.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runtime.answer import Result
from runtime.options import AskOptions


@dataclass(frozen=True)
class StampedFrame:
    image: Any  # whatever Pipeline.ask takes: a numpy frame, fmvr.frames.Frame, path, bytes, PIL
    stamp: float  # capture time, seconds on `clock` (a ROS header stamp, time.time(), ...)
    seq: int  # 0, 1, 2, ... in arrival order


@dataclass(frozen=True)
class StreamAnswer:
    question: str
    frame: StampedFrame
    result: Result
    age_ms: float  # the frame's age when the answer was complete
    dropped: int  # frames replaced before anyone answered them, so far


class LatestFrame:
    """A one-frame mailbox (thread-safe): `put` replaces, `take` waits for a frame newer than
    the last one taken."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._frame: StampedFrame | None = None
        self._taken = -1  # seq of the last frame taken
        self.received = 0
        self.dropped = 0

    def put(self, image: Any, stamp: float | None = None) -> StampedFrame:
        with self._cond:
            if self._frame is not None and self._frame.seq > self._taken:
                self.dropped += 1  # never answered, now replaced
            frame = StampedFrame(image, self.clock() if stamp is None else stamp, self.received)
            self._frame, self.received = frame, self.received + 1
            self._cond.notify_all()
            return frame

    def take(self, timeout: float | None = None, newer: bool = True) -> StampedFrame | None:
        """The newest frame; with newer=True wait (up to `timeout` s) for one not taken yet.
        None if none came in time."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._frame is not None and (not newer or self._frame.seq > self._taken), timeout
            )
            if not ok or self._frame is None:
                return None
            self._taken = max(self._taken, self._frame.seq)
            return self._frame


class FrameStream:
    """Questions about the newest frame of a live source, answered through a Pipeline."""

    def __init__(
        self,
        pipeline: Any,
        options: AskOptions | None = None,
        *,
        frame_age_counts: bool = False,
        clock: Callable[[], float] = time.time,
        **kw: Any,
    ) -> None:
        self.pipeline = pipeline
        self.options = AskOptions.of(options, **kw)
        self.frame_age_counts = frame_age_counts
        self.frames = LatestFrame(clock)
        self.clock = clock
        self._stop = threading.Event()

    # ---- frames in ----------------------------------------------------------------------------
    def put(self, image: Any, stamp: float | None = None) -> StampedFrame:
        """A new frame (a camera or ROS callback calls this); the previous one, if unanswered, is dropped."""
        return self.frames.put(image, stamp)

    def follow(self, source: Iterable[Any]) -> threading.Thread:
        """Feed frames from an iterator in a background thread (items: an image, or
        (image, stamp)); it ends with the iterator or `close()`."""

        def run() -> None:
            for item in source:
                if self._stop.is_set():
                    return
                image, stamp = item if isinstance(item, tuple) else (item, None)
                self.put(image, stamp)

        t = threading.Thread(target=run, name="fmvr-frames", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self._stop.set()

    @property
    def dropped(self) -> int:
        return self.frames.dropped

    # ---- answers out --------------------------------------------------------------------------
    def ask(self, question: str, wait_s: float | None = 5.0, newer: bool = False, **kw: Any) -> StreamAnswer:
        """On demand: answer `question` about the newest frame (waiting up to `wait_s` for the
        first one; with newer=True for one not answered yet). Options override the stream's."""
        frame = self.frames.take(wait_s, newer=newer)
        if frame is None:
            raise TimeoutError(f"no {'new ' if newer else ''}frame arrived within {wait_s} s")
        return self._answer(question, frame, AskOptions.of(self.options, **kw))

    def periodic(
        self, question: str, rate_hz: float, count: int | None = None, wait_s: float | None = 5.0
    ) -> Iterator[StreamAnswer]:
        """Ask `question` at `rate_hz` about the newest frame not yet answered, until `count`
        answers, `close()`, or no new frame for `wait_s`. A slow answer delays the next tick
        (no backlog of ticks builds up)."""
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        period, n = 1.0 / rate_hz, 0
        next_tick = time.monotonic()
        while not self._stop.is_set() and (count is None or n < count):
            delay = next_tick - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            frame = self.frames.take(wait_s, newer=True)
            if frame is None:
                return
            yield self._answer(question, frame, self.options)
            n += 1
            next_tick = max(next_tick + period, time.monotonic())

    def _answer(self, question: str, frame: StampedFrame, opts: AskOptions) -> StreamAnswer:
        waited = max(0.0, (self.clock() - frame.stamp) * 1e3) if self.frame_age_counts else 0.0
        ans = self.pipeline.stream(frame.image, question, opts, waited_ms=waited)
        for _ in ans:
            pass
        assert ans.result is not None
        age_ms = (self.clock() - frame.stamp) * 1e3
        return StreamAnswer(question, frame, ans.result, age_ms, self.frames.dropped)
