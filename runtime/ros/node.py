"""`python -m runtime.ros` (or `fmvr-ros`): a ROS 2 node answering questions about the newest frame.

    python -m runtime.ros --bundle bundle/ --latency-ms 200 [--rate-hz 1 --prompt "Is the path clear?"] \
        [--ros-args -r image:=/camera/color/image_raw -p qos_depth:=1]

Subscribes  image (sensor_msgs/Image: rgb8 bgr8 rgba8 bgra8 mono8 mono16 as raw pixels via fmvr.frames,
            no JPEG round trip; other encodings: a warning, the frame dropped), image/compressed
            (sensor_msgs/CompressedImage: the bytes path) and question (std_msgs/String).
Publishes   answer (std_msgs/String): JSON with the answer, question, mode, budget, deadline_met,
            latency_ms, predicted_ms / measured_ms, the frame's header stamp {sec, nanosec}, frame_id,
            age_ms (node clock - stamp, when answered), frames dropped / received / rejected so far;
            "error" instead of "answer" when a question could not be answered.

Callbacks only `put` into runtime.ros.stream's one-frame mailbox (a burst never queues: the newest frame
replaces an unanswered one, counted as dropped); answers run in worker threads. Each flag is a ROS
parameter too (--latency-ms -> latency_ms): the flag sets its default, `--ros-args -p` wins. rclpy
is imported in main() only: ROS 2 from /opt/ros/<distro>, or the `ros` extra (PyPI wheels).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from fmvr.frames import ENCODINGS, Frame
from runtime.llm import KVCacheFull
from runtime.options import OBJECTIVES, AskOptions
from runtime.policy import DeadlineError
from runtime.ros.stream import FrameStream, StreamAnswer
from runtime.vision import BACKENDS

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline

APT = "with ROS 2 from apt (Humble, Jazzy): source /opt/ros/<distro>/setup.bash"
INSTALL = f"install the ROS extra: make ros (x86-64 CPython 3.11 wheels from PyPI), or {APT}"
LIBS_HINT = (
    f"its C libraries are not on LD_LIBRARY_PATH: {APT}; with the PyPI wheels, start Python without "
    "_ROS_WHEELS_BOOTSTRAP_COMPLETE set (their ros_wheels_bootstrapper then sets LD_LIBRARY_PATH and re-executes Python)"
)
RELIABILITY = ("best_effort", "reliable")
CHOICES = {"backend": BACKENDS, "objective": OBJECTIVES, "reliability": RELIABILITY}
TEXT_DEPTH = 10  # questions and answers: reliable, keep-last 10; more waiting questions are refused
RESULT_FIELDS = ("answer", "budget", "deadline_met", "predicted_deadline_met", "latency_ms", "objective")
RESULT_FIELDS += ("reason", "predicted_ms", "measured_ms", "finish_reason", "backend")
# bad frame/image/options, no frame, strict deadline, the other worker holding the KV memory budget
ANSWER_ERRORS = (ValueError, TimeoutError, DeadlineError, KVCacheFull)
HELP = {
    "bundle": "bundle directory (made by `python -m export`)",
    "backend": "vision backend (auto: from manifest + device)",
    "threads": "onnxruntime intra-op threads (0: its default)",
    "latency_ms": "latency budget per answer in ms (0: none, the largest visual-token budget)",
    "objective": "what must fit latency_ms: ttft (time to first token) or total",
    "max_new_tokens": "answer length limit in tokens",
    "rate_hz": "periodic mode: ask --prompt about the newest new frame at this rate (0: on demand only)",
    "prompt": "the question that periodic mode asks",
    "qos_depth": "keep-last depth of the image subscriptions (1: only the newest frame waits)",
    "reliability": "image subscriptions: best_effort (matches every camera) or reliable",
    "frame_age_counts": "a frame's age when its question starts counts against latency_ms",
    "frame_wait_s": "how long an on-demand question waits for a first frame (then an error answer)",
    "profile_if_missing": "measure this device's latency profile at start if the bundle has none",
}


@dataclass(frozen=True)
class Settings:
    """The node's ROS parameters; the flags are these names with dashes."""

    bundle: str = ""
    backend: str = "auto"
    threads: int = 0
    latency_ms: float = 0.0
    objective: str = "ttft"
    max_new_tokens: int = 32
    rate_hz: float = 0.0
    prompt: str = "What is ahead?"
    qos_depth: int = 1
    reliability: str = "best_effort"
    frame_age_counts: bool = False
    frame_wait_s: float = 5.0
    profile_if_missing: bool = False

    def check(self) -> Settings:
        """Self, or a ValueError naming the parameter and what to do."""
        if not self.bundle:
            raise ValueError("no bundle: pass --bundle DIR (or --ros-args -p bundle:=DIR)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name, low in {"latency_ms": 0, "rate_hz": 0, "threads": 0, "qos_depth": 1}.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.frame_wait_s <= 0:
            raise ValueError(f"frame_wait_s must be > 0 s, got {self.frame_wait_s}")
        if self.rate_hz > 0 and not self.prompt.strip():
            raise ValueError("rate_hz > 0 asks --prompt periodically: give a non-empty prompt")
        self.options()  # OptionsError (a ValueError) names a bad max_new_tokens
        return self

    def options(self) -> AskOptions:
        return AskOptions(
            latency_ms=self.latency_ms or None, objective=self.objective, max_new_tokens=self.max_new_tokens
        )


def _coerce(name: str, default: Any, value: Any) -> Any:
    """A ROS parameter's value as the type of its default (an int is accepted for a float)."""
    want = type(default)
    value = float(value) if want is float and type(value) is int else value
    if type(value) is not want:
        raise ValueError(f"parameter {name} must be of type {want.__name__}, got {value!r}")
    return value


def declare(node: Any, defaults: Settings) -> Settings:
    """Declare every setting as a ROS parameter (default: `defaults`) and read them back."""
    from rcl_interfaces.msg import ParameterDescriptor

    values = {}
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        # read once at start (read_only); any type is accepted here and checked by _coerce
        desc = ParameterDescriptor(description=HELP[f.name], dynamic_typing=True, read_only=True)
        values[f.name] = _coerce(f.name, default, node.declare_parameter(f.name, default, desc).value)
    return Settings(**values)


def ros_image(msg: Any) -> Frame | bytes:
    """What Pipeline.stream takes for a message: a Frame for sensor_msgs/Image, else the bytes."""
    if hasattr(msg, "encoding"):
        return Frame.from_buffer(
            msg.data, msg.width, msg.height, msg.encoding, msg.step, bool(msg.is_bigendian)
        )
    return bytes(msg.data)  # sensor_msgs/CompressedImage: jpeg/png through the bytes path


class FromRos:
    """The pipeline as FrameStream calls it, converting the ROS message in the answering thread."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def stream(self, msg: Any, question: str, options: AskOptions, waited_ms: float = 0.0) -> Any:
        return self.pipeline.stream(ros_image(msg), question, options, waited_ms=waited_ms)


def _stamp(header: Any) -> float | None:
    """The header stamp in seconds; None when unset (0, 0): the frame is then stamped on receipt."""
    sec, nsec = header.stamp.sec, header.stamp.nanosec
    return None if sec == 0 and nsec == 0 else sec + nsec * 1e-9


def answer_json(a: StreamAnswer, mode: str) -> dict[str, Any]:
    stamp, frame_id = a.frame.image.header.stamp, a.frame.image.header.frame_id
    return {
        "question": a.question,
        "mode": mode,
        **{k: getattr(a.result, k) for k in RESULT_FIELDS},
        "stamp": {"sec": stamp.sec, "nanosec": stamp.nanosec},
        "frame_id": frame_id,
        "seq": a.frame.seq,
        "age_ms": a.age_ms,
        "dropped": a.dropped,
    }


class AnswerNode:
    """The ROS side of a FrameStream: subscriptions put frames, worker threads answer and publish."""

    def __init__(self, node: Any, pipeline: Any, settings: Settings) -> None:
        from std_msgs.msg import String

        self.node, self.settings, self.String = node, settings, String
        self.stream = FrameStream(
            FromRos(pipeline), settings.options(), frame_age_counts=settings.frame_age_counts, clock=self.now
        )
        self.rejected, self.failure = 0, None
        self.questions: queue.Queue[str | None] = queue.Queue()
        self.pub, self.subs = self._connect(node, settings)
        self._stop = threading.Event()
        self.workers = [self._start(self._answer_questions, "fmvr-questions")]
        if settings.rate_hz > 0:
            self.workers.append(self._start(self._periodic, "fmvr-periodic"))

    def _connect(self, node: Any, s: Settings) -> tuple[Any, dict[str, Any]]:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        image_qos = QoSProfile(
            depth=s.qos_depth, reliability=getattr(ReliabilityPolicy, s.reliability.upper())
        )
        text_qos = QoSProfile(depth=TEXT_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        kinds = [
            (Image, "image", self.on_image, image_qos),
            (CompressedImage, "image/compressed", self.on_frame, image_qos),
            (self.String, "question", self.on_question, text_qos),
        ]
        subs = {
            f"{k[0].__module__.split('.')[0]}/{k[0].__name__}": node.create_subscription(*k) for k in kinds
        }
        return node.create_publisher(self.String, "answer", text_qos), subs

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    # ---- callbacks: no inference here ---------------------------------------------------------
    def on_image(self, msg: Any) -> None:
        if msg.encoding not in ENCODINGS:
            self.rejected += 1
            self.node.get_logger().warning(
                f"dropped a frame with encoding {msg.encoding!r} (frame_id {msg.header.frame_id!r}, "
                f"{self.rejected} so far): not supported; publish one of {', '.join(ENCODINGS)}",
                throttle_duration_sec=5.0,
            )
            return
        self.on_frame(msg)

    def on_frame(self, msg: Any) -> None:  # a sensor_msgs/Image or CompressedImage
        self.stream.put(msg, _stamp(msg.header))

    def on_question(self, msg: Any) -> None:
        if self.questions.qsize() >= TEXT_DEPTH:
            self.publish(
                {"question": msg.data, "mode": "on_demand", "error": f"busy: {TEXT_DEPTH} questions wait"}
            )
            return
        self.questions.put(msg.data)

    # ---- workers ------------------------------------------------------------------------------
    def _start(self, target: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # not an answer's error: a bug; stop the node loudly
                self.failure = e
                self.node.get_logger().fatal(f"{name} failed: {type(e).__name__}: {e}; shutting down")
                self.node.context.try_shutdown()
                raise

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    def _answer_questions(self) -> None:
        while (question := self.questions.get()) is not None:
            try:
                a = self.stream.ask(question, wait_s=self.settings.frame_wait_s)
            except ANSWER_ERRORS as e:
                self.error(question, "on_demand", e)
                continue
            self.publish(answer_json(a, "on_demand"))

    def _periodic(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            try:
                # the generator ends after 1 s without a new frame; then it starts again
                for a in self.stream.periodic(s.prompt, s.rate_hz, wait_s=1.0):
                    self.publish(answer_json(a, "periodic"))
            except ANSWER_ERRORS as e:
                self.error(s.prompt, "periodic", e)

    def error(self, question: str, mode: str, e: BaseException) -> None:
        self.node.get_logger().warning(f"no answer to {question!r}: {type(e).__name__}: {e}")
        self.publish({"question": question, "mode": mode, "error": f"{type(e).__name__}: {e}"})

    def publish(self, d: dict[str, Any]) -> None:
        frames = self.stream.frames  # an answer's own `dropped` (when it was complete) wins
        d = d | {
            "dropped": d.get("dropped", frames.dropped),
            "received": frames.received,
            "rejected": self.rejected,
        }
        self.pub.publish(self.String(data=json.dumps(d)))

    def close(self) -> None:
        self._stop.set()
        self.stream.close()
        self.questions.put(None)
        for t in self.workers:
            t.join(timeout=5.0)  # an answer in flight finishes (daemon threads: exit regardless)

    def topics(self) -> str:
        s = self.settings
        subs = ", ".join(f"{sub.topic_name} ({kind})" for kind, sub in self.subs.items())
        mode = f"periodic {s.rate_hz:g} Hz {s.prompt!r} + on demand" if s.rate_hz > 0 else "on demand"
        return (
            f"subscribes {subs}; publishes {self.pub.topic_name} (std_msgs/String, JSON); "
            f"images keep-last {s.qos_depth} {s.reliability}; {mode}"
        )


def profile_lines(pipe: Pipeline, s: Settings) -> list[str]:
    """The backend and the latency profile, as logged at start."""
    power = pipe.device.get("power_mode")
    lines = [
        f"backend: vision {pipe.vision.name} ({pipe.vision.provider}), LLM {pipe.decoder.provider}"
        + (f", power mode {power}" if power else "")
    ]
    if pipe.policy is None:
        return [*lines, f"latency profile: none ({pipe.profile_note}); answers at the largest budget"]
    n = len(pipe.prompt_ids(s.prompt)) - 1  # text tokens of the prompt, less the image placeholder
    pred = {t: pipe.policy.predict(t, n, s.max_new_tokens).time(s.objective) for t in pipe.budgets}
    lines.append(
        f"latency profile: {pipe.profile_note}; predicted {s.objective} ms per budget: "
        + ", ".join(f"{t}: {ms:.1f}" for t, ms in pred.items())
    )
    if s.latency_ms:
        c = pipe.policy.choose(s.latency_ms, n, s.max_new_tokens, s.objective)
        lines.append(f"latency_ms {s.latency_ms:g} -> {c.budget} visual tokens ({c.reason})")
    return lines


def load_pipeline(s: Settings) -> Any:
    """The bundle's Pipeline, with a latency profile if latency_ms needs one (else a ValueError)."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(s.bundle, backend=s.backend, threads=s.threads, warmup=True)
    if s.latency_ms and pipe.policy is None:
        if not s.profile_if_missing:
            raise ValueError(
                f"latency_ms needs a latency profile: {pipe.profile_note}, or pass --profile-if-missing"
            )
        pipe.measure_profile()
    return pipe


def import_rclpy() -> Any:
    """rclpy (and the messages), or an ImportError that says how to install them."""
    try:
        import rclpy
        import rclpy.executors
        import sensor_msgs.msg  # noqa: F401
        import std_msgs.msg  # noqa: F401
    except ModuleNotFoundError as e:
        raise ImportError(f"ROS 2 for Python is not installed ({e}); {INSTALL}") from e
    except ImportError as e:  # found, but a shared library did not load
        raise ImportError(f"rclpy did not load ({e}); {LIBS_HINT}") from e
    return rclpy


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m runtime.ros",
        description="A ROS 2 node answering questions about the newest camera frame within a latency budget.",
        epilog="ROS arguments follow --ros-args: remap topics (-r image:=/camera/image_raw), "
        "set parameters (-p latency_ms:=150; they win over the flags), namespace (-r __ns:=/robot1).",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            kind, help = type(f.default), f"{HELP[f.name]} (default: %(default)s)"
            ap.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=help)
    ap.add_argument("--verbose", action="store_true", help="log the runtime's backend choice and notes too")
    return ap


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our flags, and the ROS arguments from the first --ros-args on (as `ros2 run` passes them)."""
    i = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    return argv[:i], argv[i:]


def _run(rclpy: Any, node: Any, defaults: Settings) -> int:
    """Declare, load, answer until Ctrl-C / shutdown; 2 for bad settings or bundle, 1 if a worker failed."""
    try:
        s = declare(node, defaults).check()
        pipe = load_pipeline(s)
    except ValueError as e:  # BundleError, ProfileError and OptionsError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = AnswerNode(node, pipe, s)
    for line in profile_lines(pipe, s):
        node.get_logger().info(line)
    print(f"{node.get_fully_qualified_name()}: {app.topics()}", flush=True)
    executor = rclpy.executors.SingleThreadedExecutor(context=node.context)  # callbacks only put
    executor.add_node(node)
    try:
        while node.context.ok():  # back in Python 10 times a second, so Ctrl-C and SIGTERM get through
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        app.close()
        executor.shutdown()
    return 1 if app.failure else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ours, ros_args = _split(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(ours)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    defaults = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    try:
        rclpy = import_rclpy()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rclpy.signals import SignalHandlerOptions

    # Ctrl-C and SIGTERM: a KeyboardInterrupt in the spin loop (rclpy's own handler raised it again later)
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    rclpy.init(args=["fmvr-ros", *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("fmvr")
    try:
        return _run(rclpy, node, defaults)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    raise SystemExit(main())
