"""The ROS 2 node on real rclpy over loopback: one answer per question about the newest frame with its
stamp, no backlog after a burst, periodic mode, bad frames dropped, flags/parameters, exit codes."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip(
    "rclpy", reason="rclpy is not installed: `make ros` (PyPI wheels) or source /opt/ros/<distro>/setup.bash"
)
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from runtime.answer import Result  # noqa: E402
from runtime.ros.node import AnswerNode, Settings, declare, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# A domain of our own per run (other runs on this machine stay apart), discovery on localhost only.
ROS_ENV = {"ROS_DOMAIN_ID": str(1 + os.getpid() % 100), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
_names = itertools.count()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ROS_ENV.items():
            mp.setenv(k, v)
        mp.setenv("ROS_LOG_DIR", str(tmp_path_factory.mktemp("ros-log")))  # not ~/.ros/log
        context = rclpy.Context()
        rclpy.init(context=context)
        yield context
        context.try_shutdown()


def wait_for(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def image_msg(sec, nanosec=0, frame_id="cam", encoding="rgb8", h=48, w=64, data=None):
    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id = sec, nanosec, frame_id
    m.height, m.width, m.encoding, m.step = h, w, encoding, w * 3
    m.data = (
        np.random.default_rng(sec).integers(0, 256, h * w * 3, np.uint8).tobytes() if data is None else data
    )
    return m


class Loop:
    """The node under test (in a namespace of its own) and a peer that publishes images and questions
    and collects the answers, both spun by one executor in a background thread."""

    def __init__(self, ctx, pipeline, node_cls=AnswerNode, **settings):
        ns = f"/t{os.getpid()}_{next(_names)}"
        self.node = rclpy.create_node("fmvr", namespace=ns, context=ctx)
        self.app = node_cls(self.node, pipeline, Settings(bundle="-", **settings).check())
        self.peer = rclpy.create_node("peer", namespace=ns, context=ctx)
        depth = settings.get("qos_depth", 1)
        rel = getattr(ReliabilityPolicy, settings.get("reliability", "best_effort").upper())
        self.images = self.peer.create_publisher(Image, "image", QoSProfile(depth=100, reliability=rel))
        self.jpegs = self.peer.create_publisher(CompressedImage, "image/compressed", depth)
        self.questions = self.peer.create_publisher(String, "question", RELIABLE)
        self.answers: list[dict] = []
        self.peer.create_subscription(
            String, "answer", lambda m: self.answers.append(json.loads(m.data)), RELIABLE
        )
        self.executor = SingleThreadedExecutor(context=ctx)
        for n in (self.node, self.peer):
            self.executor.add_node(n)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        for pub in (self.images, self.jpegs, self.questions):
            wait_for(lambda pub=pub: pub.get_subscription_count() > 0, what=f"{pub.topic_name} to match")
        wait_for(lambda: self.app.pub.get_subscription_count() > 0, what="the answer topic to match")

    def frame(self, msg, pub=None):
        """Publish until the node has it (best effort may lose the first message after matching)."""
        before = self.app.stream.frames.received
        for _ in range(10):
            (pub or self.images).publish(msg)
            try:
                return wait_for(lambda: self.app.stream.frames.received > before, timeout=1.0)
            except AssertionError:
                continue
        raise AssertionError("the node never received the frame")

    def ask(self, question):
        want = len(self.answers) + 1
        self.questions.publish(String(data=question))
        wait_for(lambda: len(self.answers) >= want, what=f"an answer to {question!r}")
        return self.answers[-1]

    def close(self):
        self.app.close()
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()


@pytest.fixture
def loop(ctx):
    made = []

    def make(pipeline, **kw):
        made.append(Loop(ctx, pipeline, **kw))
        return made[-1]

    yield make
    for lp in made:
        lp.close()


@pytest.fixture(scope="module")
def real_pipe(tiny_bundle):
    """The tiny exported bundle with a freshly measured profile (not saved: the bundle is shared)."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, threads=1)
    pipe.measure_profile(warmup=1, runs=2, save=False)
    return pipe


class FakePipeline:
    """Pipeline.stream's interface; records what it answered; `gate` (if set) holds every answer
    until the test releases it, so a test can publish frames while an answer is running."""

    def __init__(self, gate: bool = False) -> None:
        self.answered: list = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not gate:
            self.release.set()

    def stream(self, image, question, options, waited_ms=0.0):
        self.answered.append(image)
        self.entered.set()
        assert self.release.wait(10), "the test never released the answer"
        result = Result(
            answer=f"about a {image.width}x{image.height} frame",
            token_ids=[1],
            budget=9,
            backend="fake",
            llm_provider="fake",
            finish_reason="length",
            prompt_tokens=10,
            latency_ms=options.latency_ms,
            objective=options.objective,
            deadline_met=True,
            predicted_deadline_met=True,
            reason="fake",
            predicted_ms={"ttft": 1.0},
            measured_ms={"ttft": 2.0},
        )

        class Ans:
            def __iter__(self):
                return iter(())

        Ans.result = result
        return Ans()


def test_one_answer_per_question_about_the_newest_frame_within_the_deadline(loop, real_pipe):
    lp = loop(real_pipe, latency_ms=10_000.0, max_new_tokens=2)
    now = lp.node.get_clock().now().seconds_nanoseconds()
    lp.frame(image_msg(now[0], now[1], frame_id="camera_optical"))
    answers = [lp.ask(q) for q in ("What is this?", "Is the door open?")]
    time.sleep(0.3)
    assert len(lp.answers) == 2  # one answer per question, no more
    for a, q in zip(answers, ("What is this?", "Is the door open?")):
        assert a["question"] == q and a["mode"] == "on_demand" and "error" not in a
        assert a["stamp"] == {"sec": now[0], "nanosec": now[1]} and a["frame_id"] == "camera_optical"
        assert a["deadline_met"] is True and a["latency_ms"] == 10_000.0 and a["budget"] in real_pipe.budgets
        assert a["measured_ms"]["ttft"] > 0 and a["predicted_ms"]["ttft"] > 0 and 0 <= a["age_ms"] < 60_000
        assert (a["dropped"], a["received"], a["rejected"]) == (0, 1, 0)
    lp.frame(image_msg(now[0] - 10, frame_id="older"))  # the newest frame, stamped 10 s ago
    a = lp.ask("And now?")
    assert a["stamp"] == {"sec": now[0] - 10, "nanosec": 0} and a["frame_id"] == "older" and a["seq"] == 1
    assert a["age_ms"] >= 10_000  # the age runs from the header stamp, not from arrival


def test_compressed_images_take_the_bytes_path(loop, real_pipe):
    from PIL import Image as PILImage

    lp = loop(real_pipe, max_new_tokens=2)
    buf = io.BytesIO()
    PILImage.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    msg = CompressedImage(format="jpeg", data=buf.getvalue())
    msg.header.stamp.sec, msg.header.frame_id = 7, "jpeg_cam"
    lp.frame(msg, lp.jpegs)
    a = lp.ask("What colour is it?")
    assert a["stamp"]["sec"] == 7 and a["frame_id"] == "jpeg_cam" and a["budget"] == max(real_pipe.budgets)
    direct = real_pipe.ask(buf.getvalue(), "What colour is it?", max_new_tokens=2)
    assert a["deadline_met"] is None and a["answer"] == direct.answer  # the same bytes path


class Watched(AnswerNode):
    """Records the stamps its image callback saw (to know when a burst is all in)."""

    def on_image(self, msg):
        super().on_image(msg)
        self.seen = [*getattr(self, "seen", []), msg.header.stamp.sec]


def test_a_burst_of_100_frames_leaves_no_backlog(loop):
    fake = FakePipeline(gate=True)
    lp = loop(fake, node_cls=Watched, reliability="reliable")
    lp.frame(image_msg(1000))
    lp.questions.publish(String(data="first"))
    assert fake.entered.wait(10)  # answering frame 1000, held until released
    for i in range(1, 101):
        lp.images.publish(image_msg(1000 + i, w=8, h=4))
    # the callbacks keep running while an answer is in flight: the burst's last frame gets in
    wait_for(lambda: lp.app.seen[-1] == 1100, what="the burst's last frame")
    lp.questions.publish(String(data="second"))
    wait_for(lambda: lp.app.questions.qsize() == 1, what="the second question")
    fake.release.set()
    wait_for(lambda: len(lp.answers) == 2, what="two answers")
    time.sleep(0.3)
    first, second = lp.answers
    assert len(lp.answers) == 2 and len(fake.answered) == 2  # not 101 answers: no backlog
    assert first["stamp"]["sec"] == 1000 and second["question"] == "second"
    assert second["stamp"]["sec"] == 1100  # only the newest frame of the burst was answered
    received = lp.app.stream.frames.received  # <= 101: DDS's keep-last 1 may coalesce some itself
    assert 2 <= received <= 101 and second["received"] == received
    # dropped so far, when each answer was complete (the burst was in before the first one was):
    # every frame of the burst but the newest
    assert first["dropped"] == second["dropped"] == received - 2


def test_periodic_mode_answers_each_new_frame_once(loop):
    fake = FakePipeline()
    lp = loop(fake, rate_hz=50.0, prompt="What is ahead?", reliability="reliable")
    for i in range(3):
        lp.frame(image_msg(50 + i))
        wait_for(lambda i=i: len(lp.answers) == i + 1, what=f"periodic answer {i}")
    time.sleep(0.3)  # no new frame: no new answer
    assert [a["stamp"]["sec"] for a in lp.answers] == [50, 51, 52]
    assert {a["mode"] for a in lp.answers} == {"periodic"} and {a["question"] for a in lp.answers} == {
        "What is ahead?"
    }
    assert lp.ask("On demand too?")["stamp"]["sec"] == 52  # the newest, even if answered already


def test_a_bad_frame_is_logged_and_dropped_and_the_node_keeps_answering(loop, capfd):
    lp = loop(FakePipeline(), reliability="reliable")
    lp.images.publish(image_msg(5, encoding="yuv422"))
    wait_for(lambda: lp.app.rejected == 1, what="the yuv422 frame to be rejected")
    assert lp.app.stream.frames.received == 0
    short = image_msg(6, data=bytes(10))  # rgb8 48x64 needs 9216 bytes
    lp.frame(short)
    err = lp.ask("What is this?")
    assert "buffer holds 10 bytes" in err["error"] and "answer" not in err and err["rejected"] == 1
    lp.frame(image_msg(7))
    ok = lp.ask("And this?")
    assert ok["answer"] == "about a 64x48 frame" and ok["stamp"]["sec"] == 7
    logged = capfd.readouterr().err
    assert "encoding 'yuv422'" in logged and "rgb8" in logged


def test_a_question_before_any_frame_gets_an_error_answer(loop):
    lp = loop(FakePipeline(), frame_wait_s=0.05)
    a = lp.ask("Anyone there?")
    assert a["error"] == "TimeoutError: no frame arrived within 0.05 s" and a["question"] == "Anyone there?"


def test_ros_parameters_override_flags_and_are_checked(ctx):
    overrides = [Parameter("latency_ms", value=150), Parameter("rate_hz", value=2.5)]
    node = rclpy.create_node("params", context=ctx, parameter_overrides=overrides)
    try:
        s = declare(node, Settings(bundle="b", latency_ms=80.0, max_new_tokens=5))
        assert (s.latency_ms, s.rate_hz, s.max_new_tokens, s.bundle) == (150.0, 2.5, 5, "b")
        assert node.get_parameter("qos_depth").value == 1
    finally:
        node.destroy_node()
    for name, value, want in (("latency_ms", "fast", "float"), ("max_new_tokens", 5.0, "int")):
        bad = rclpy.create_node("bad", context=ctx, parameter_overrides=[Parameter(name, value=value)])
        try:
            with pytest.raises(ValueError, match=f"parameter {name} must be of type {want}, got {value!r}"):
                declare(bad, Settings())
        finally:
            bad.destroy_node()
    with pytest.raises(ValueError, match="qos_depth must be >= 1"):
        Settings(bundle="b", qos_depth=0).check()
    with pytest.raises(ValueError, match="no bundle"):
        Settings().check()


def test_a_missing_bundle_exits_with_its_path_and_the_export_command(ctx, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["--bundle", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "python -m export" in err


def test_without_rclpy_it_says_how_to_install_it():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'rclpy': raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from runtime.ros.node import main\n"
        "raise SystemExit(main(['--bundle', 'b']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "ROS 2 for Python is not installed" in out.stderr and "make ros" in out.stderr
    assert "source /opt/ros/<distro>/setup.bash" in out.stderr


def test_python_m_runtime_ros_answers_and_stops_on_sigterm(ctx, tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")  # --profile-if-missing writes a profile
    cmd = [sys.executable, "-m", "runtime.ros", "--bundle", str(bundle), "--latency-ms", "10000"]
    cmd += [
        "--max-new-tokens",
        "2",
        "--profile-if-missing",
        "--ros-args",
        "-r",
        "__ns:=/e2e" + str(os.getpid()),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "subscribes" in line and "/image (sensor_msgs/Image)" in line, line + proc.stderr.read()
        assert "publishes /e2e" in line and "/answer (std_msgs/String, JSON)" in line
        peer = rclpy.create_node("peer", namespace="/e2e" + str(os.getpid()), context=ctx)
        pub = peer.create_publisher(Image, "image", RELIABLE)
        ask = peer.create_publisher(String, "question", RELIABLE)
        got: list[dict] = []
        peer.create_subscription(String, "answer", lambda m: got.append(json.loads(m.data)), RELIABLE)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(peer)
        threading.Thread(target=ex.spin, daemon=True).start()
        wait_for(lambda: pub.get_subscription_count() and ask.get_subscription_count(), what="matching")
        wait_for(lambda: peer.count_publishers("answer") > 0, what="the answer publisher")
        peer.create_timer(0.05, lambda: pub.publish(image_msg(3, frame_id="e2e")))  # a 20 fps camera
        time.sleep(0.3)
        ask.publish(String(data="What is it?"))
        wait_for(lambda: got, what="the node's answer")
        assert got[0]["frame_id"] == "e2e" and got[0]["deadline_met"] is True
        ex.shutdown()
        peer.destroy_node()
        proc.send_signal(signal.SIGTERM)  # as ros2 launch / systemd stop it (Ctrl-C takes the same path)
        assert proc.wait(20) == 0
        err = proc.stderr.read()
        assert "backend: vision ort-cpu" in err and "predicted ttft ms per budget" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
