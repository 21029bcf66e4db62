"""OpenAI chat-completions wire format: request parsing and response bodies (stdlib only).

Request extensions: `latency_budget_ms` (pick the largest budget that fits), `visual_tokens`
(force a budget), `objective` ("ttft" | "total"), `strict` (error instead of a missed deadline).
Responses carry `usage.visual_tokens`, `usage.timings_ms` (measured and predicted per stage),
`usage.deadline_met` and `usage.backend`.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from fmvr.template import IMAGE_TOKEN

MAX_REMOTE_IMAGE_BYTES = 20 * 1024 * 1024


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


@dataclass
class ChatRequest:
    turns: list[dict[str, str]]
    image: bytes
    stream: bool = False
    include_usage: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)  # for Pipeline.stream


def _num(body: dict[str, Any], key: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}, got {v!r}", param=key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {v}", param=key)
    return v


def parse_request(body: Any, allow_remote: bool, max_new_tokens_limit: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns, images = _turns(msgs)
    if len(images) != 1:
        raise ApiError(400, f"this model answers about exactly one image per conversation; got {len(images)} "
                       "(add one image_url part with a data: URI)", param="messages")  # fmt: skip
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    max_tokens = _num(body, "max_completion_tokens", int, 1, max_new_tokens_limit)
    max_tokens = max_tokens or _num(body, "max_tokens", int, 1, max_new_tokens_limit) or 64
    objective = body.get("objective", "ttft")
    if objective not in ("ttft", "total"):
        raise ApiError(400, "'objective' must be 'ttft' or 'total'", param="objective")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    kwargs = {
        "max_new_tokens": max_tokens,
        "temperature": _num(body, "temperature", float, 0.0, 2.0) or 0.0,
        "top_p": _num(body, "top_p", float, 1e-6, 1.0) or 1.0,
        "seed": _num(body, "seed", int, 0, 2**63 - 1),
        "stop": tuple(stop),
        "latency_ms": _num(body, "latency_budget_ms", float, 0.0),
        "tokens": _num(body, "visual_tokens", int, 1),
        "objective": objective,
        "strict": bool(body.get("strict", False)),
    }
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(turns, _image_bytes(images[0], allow_remote), bool(body.get("stream", False)),
                       bool(opts.get("include_usage", True)), kwargs)  # fmt: skip


def _turns(msgs: list[Any]) -> tuple[list[dict[str, str]], list[str]]:
    turns: list[dict[str, str]] = []
    images: list[str] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        if m["role"] in ("system", "developer"):
            continue  # the chat template carries its own system prompt
        text = _content_text(m.get("content"), images, i)
        if m["role"] == "user" and len(images) == 1 and IMAGE_TOKEN not in "".join(t["value"] for t in turns):
            text = f"{IMAGE_TOKEN}\n{text}"
        turns.append({"from": "human" if m["role"] == "user" else "gpt", "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise ApiError(400, "the last message must be from the user", param="messages")
    for i, t in enumerate(turns):
        if t["from"] != ("human" if i % 2 == 0 else "gpt"):
            raise ApiError(400, "user and assistant messages must alternate, user first", param="messages")
    return turns, images


def _content_text(content: Any, images: list[str], i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"messages[{i}]: image_url needs a 'url' string", param="messages")
            images.append(url)
        else:
            raise ApiError(
                400, f"messages[{i}]: unsupported content part {kind!r} (text, image_url)", param="messages"
            )
    return "\n".join(texts)


def _image_bytes(url: str, allow_remote: bool) -> bytes:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise ApiError(
                400, "image data URIs must be base64 (data:image/png;base64,...)", param="image_url"
            )
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"the image data URI is not valid base64 ({e})", param="image_url") from e
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(400, "remote image URLs are disabled on this server; send the image as a "
                           "data: URI, or start it with --allow-remote-images", param="image_url")  # fmt: skip
        return _fetch(url)
    raise ApiError(
        400, "image_url must be a data: URI (or http(s) with --allow-remote-images)", param="image_url"
    )


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (enabled explicitly)
            data = r.read(MAX_REMOTE_IMAGE_BYTES + 1)
    except OSError as e:
        raise ApiError(400, f"could not fetch the image {url}: {e}", param="image_url") from e
    if len(data) > MAX_REMOTE_IMAGE_BYTES:
        raise ApiError(413, f"the image at {url} is larger than {MAX_REMOTE_IMAGE_BYTES} bytes")
    return data


# ---- responses ----------------------------------------------------------------------------------


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "total_tokens": result.prompt_tokens + len(result.token_ids),
        "visual_tokens": result.budget,
        "backend": result.backend,
        "deadline_met": result.deadline_met,
        "budget_reason": result.reason,
        "timings_ms": {"measured": result.measured_ms, "predicted": result.predicted_ms},
    }


def completion(cid: str, model: str, result: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.answer},
            "finish_reason": result.finish_reason,
        }],
        "usage": usage(result),
    }  # fmt: skip


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None, result: Any = None) -> dict:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if result is not None:
        out["usage"] = usage(result)
    return out
