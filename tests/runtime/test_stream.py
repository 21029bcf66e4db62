"""The latest-frame stream: only the newest frame is answered, the rest are dropped and counted."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.ros.stream import FrameStream, LatestFrame


class FakePipeline:
    """Answers instantly; while "answering" it lets `arrive` new frames come in (a camera
    faster than the model), so the test needs no timing."""

    def __init__(self, arrive: int = 0) -> None:
        self.arrive, self.answered, self.waited = arrive, [], []
        self.stream_obj: FrameStream | None = None

    def stream(self, image, question, options, waited_ms=0.0):
        self.answered.append(image)
        self.waited.append(waited_ms)
        for _ in range(self.arrive):
            self.stream_obj.put(f"frame{self.stream_obj.frames.received}")

        class Ans:
            result = SimpleNamespace(answer=f"about {image}", budget=options.tokens)

            def __iter__(self):
                return iter(())

        return Ans()


def make(arrive=0, **kw):
    pipe = FakePipeline(arrive)
    stream = FrameStream(pipe, tokens=9, **kw)
    pipe.stream_obj = stream
    return pipe, stream


def test_mailbox_keeps_the_newest_and_counts_the_dropped():
    box = LatestFrame()
    for i in range(5):
        box.put(i)
    assert (box.received, box.dropped) == (5, 4)
    assert box.take(0).image == 4
    box.put(5)  # the frame before it was answered: nothing dropped
    assert box.dropped == 4
    assert box.take(0).image == 5
    assert box.take(0.01) is None  # nothing newer
    assert box.take(0, newer=False).image == 5  # the newest, again


def test_a_slow_answerer_sees_only_the_newest_frames():
    pipe, stream = make(arrive=3)  # 3 frames arrive during every answer
    stream.put("frame0")
    answers = list(stream.periodic("What is ahead?", rate_hz=1000, count=3))
    assert pipe.answered == ["frame0", "frame3", "frame6"]
    assert [a.frame.seq for a in answers] == [0, 3, 6]
    assert [a.dropped for a in answers] == [2, 4, 6]  # so far: 1, 2 (during the first answer), 4, 5, 7, 8
    assert stream.frames.received == 10 and stream.dropped == 6  # frame 9 waits, not dropped
    assert answers[1].result.answer == "about frame3" and answers[1].result.budget == 9


def test_answers_carry_stamp_and_age_and_frame_age_can_count(monkeypatch):
    now = [100.0]
    pipe, stream = make(clock=lambda: now[0], frame_age_counts=True)
    stream.put("f", stamp=99.75)  # captured 250 ms ago
    a = stream.ask("q")
    assert a.frame.stamp == 99.75 and a.age_ms == pytest.approx(250.0)
    assert pipe.waited == [pytest.approx(250.0)]  # counted against the latency budget
    pipe2, stream2 = make(clock=lambda: now[0])
    stream2.put("f", stamp=99.75)
    stream2.ask("q")
    assert pipe2.waited == [0.0]


def test_on_demand_waits_for_a_frame_and_says_when_none_came():
    _, stream = make()
    with pytest.raises(TimeoutError, match="no frame arrived within 0.01 s"):
        stream.ask("q", wait_s=0.01)
    threading.Timer(0.05, stream.put, args=("late",)).start()
    assert stream.ask("q", wait_s=5).frame.image == "late"


def test_follow_feeds_from_an_iterator_and_periodic_stops_when_frames_stop():
    pipe, stream = make()
    t = stream.follow([("a", 1.0), ("b", 2.0)])
    t.join()
    answers = list(stream.periodic("q", rate_hz=1000, wait_s=0.05))
    assert [a.frame.image for a in answers] == ["b"] and stream.dropped == 1
    with pytest.raises(ValueError, match="rate_hz"):
        next(stream.periodic("q", rate_hz=0))


def test_a_real_pipeline_answers_numpy_frames(pipe):
    stream = FrameStream(pipe, tokens=1, max_new_tokens=2)
    rng = np.random.default_rng(0)
    stream.follow(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)).join()
    a = stream.ask("What is in the picture?")
    assert a.frame.seq == 2 and a.result.budget == 1 and a.dropped == 2
    assert {"ttft", "vision", "prefill"} <= set(a.result.measured_ms)  # the answer carries its timings
