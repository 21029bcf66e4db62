"""OpenAI chat-completions wire format: request parsing and response bodies (stdlib only).

Request extensions: `latency_budget_ms` (pick the largest budget that fits), `visual_tokens`
(force a budget), `objective` ("ttft" | "total"), `strict` (error instead of a missed deadline).
A request becomes a ChatRequest holding one AskOptions (runtime.options): the same options,
defaults and checks as `python -m runtime ask` and `Pipeline.ask`; a bad field is a 400 naming it.
Responses carry `usage.visual_tokens`, `usage.timings_ms` (measured and predicted per stage),
`usage.deadline_met` and `usage.backend`.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from fmvr.template import IMAGE_TOKEN
from runtime.options import AskOptions, OptionsError

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


@dataclass(frozen=True)
class ChatRequest:
    turns: list[dict[str, str]]
    image: bytes
    options: AskOptions  # everything Pipeline.stream is asked for, checked
    stream: bool = False
    include_usage: bool = True


# Our JSON field -> the AskOptions field it sets (OpenAI's names where OpenAI has one).
OPTION_FIELDS = {
    "latency_budget_ms": "latency_ms",
    "visual_tokens": "tokens",
    "objective": "objective",
    "strict": "strict",
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}
JSON_NAMES = {v: k for k, v in OPTION_FIELDS.items()}  # max_new_tokens -> max_tokens (the later key)


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


def parse_request(
    body: Any, allow_remote: bool, max_new_tokens_limit: int, timeout_s: float | None = None
) -> ChatRequest:
    """The request body -> a ChatRequest whose AskOptions carry `timeout_s` (the server's)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns, images = _turns(msgs)
    if len(images) != 1:
        raise ApiError(
            400,
            f"this model answers about exactly one image per conversation; got {len(images)} "
            "(add one image_url part with a data: URI)",
            param="messages",
        )
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    options = ask_options(body, max_new_tokens_limit, timeout_s)
    image = _image_bytes(images[0], allow_remote)
    return ChatRequest(
        turns, image, options, bool(body.get("stream", False)), bool(opts.get("include_usage", True))
    )


def ask_options(
    body: dict[str, Any], max_new_tokens_limit: int, timeout_s: float | None = None
) -> AskOptions:
    """The AskOptions of a request body; a bad field is a 400 naming the JSON field."""
    given = {
        "latency_ms": _num(body, "latency_budget_ms", float),
        "tokens": _num(body, "visual_tokens", int),
        "max_new_tokens": _num(body, "max_completion_tokens", int, 1, max_new_tokens_limit)
        or _num(body, "max_tokens", int, 1, max_new_tokens_limit),
        "temperature": _num(body, "temperature", float, 0.0, 2.0),
        "top_p": _num(body, "top_p", float),
        "seed": _num(body, "seed", int),
        "objective": body.get("objective"),
        "strict": body.get("strict"),
        "stop": body.get("stop") or None,
        "timeout_s": timeout_s,
    }
    try:  # absent fields: AskOptions' defaults, the same as the CLI's and the Python API's
        return AskOptions(**{k: v for k, v in given.items() if v is not None})
    except OptionsError as e:
        name = JSON_NAMES.get(e.field, e.field)
        raise ApiError(400, f"'{name}' {e.problem}", param=name) from e


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
            raise ApiError(
                400,
                "remote image URLs are disabled on this server; send the image as a data: URI, "
                "or start it with --allow-remote-images",
                param="image_url",
            )
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
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
    }


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
