"""The torch-free runtime: a bundle's vision graph (onnxruntime or TensorRT) paired with its
quantized ONNX decoder, and a policy that picks each request's visual-token budget from its
deadline.

    from runtime import Pipeline, Frame
    pipe = Pipeline.load("bundle")
    res = pipe.ask(Frame.from_array(rgb), "What colour is the star?", latency_ms=200)
    print(res.answer, res.budget, res.deadline_met)

The core lives at the top of the package (bundle, vision, llm, profile, measure, policy,
options, images, frame_input, answer, pipeline); the rooms build on it and never on each
other: serve/ (the OpenAI-compatible HTTP server), ros/ (the ROS 2 node and its latest-frame
mailbox), tools/ (the budget card, `runtime latency`, the batching probe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use below, so `import runtime.options` stays light
    from fmvr.frames import Frame
    from runtime.answer import Result
    from runtime.options import AskOptions
    from runtime.pipeline import Pipeline

__all__ = ["AskOptions", "Frame", "Pipeline", "Result"]
_HOMES = {
    "AskOptions": "runtime.options",
    "Frame": "fmvr.frames",
    "Pipeline": "runtime.pipeline",
    "Result": "runtime.answer",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
