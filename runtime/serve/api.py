"""OpenAI chat-completions wire format: the request model (pydantic) and response bodies.

Part of the server extra (`pip install "fmvr-edge[serve]"`): imports pydantic.

A request body is validated by `ChatCompletionRequest` (strict types, unknown fields refused)
and becomes a ChatRequest holding one AskOptions (runtime.options): the same options, defaults
and checks as `python -m runtime ask` and `Pipeline.ask`. Every problem is an ApiError (400
naming the field), never an exception that drops the connection: malformed or too deeply
nested JSON, a wrong type, an unknown field, or an OpenAI field this server does not implement
(`tools`, `response_format`, `logprobs`, `n` > 1, ...; each is accepted only at its "off"
value: null, false, 0, 1 for `n`, an empty list). `model` and `user` are accepted and ignored
(one model per server).

Images: one or more `image_url` parts in the user message(s), in order (the last is the
newest); each becomes one `<image>` placeholder in front of its message's text, unless the text
already holds one `<image>` per image (then they stay where they are).

Request extensions: `latency_budget_ms` (pick the largest budgets that fit), `visual_tokens`
(force a budget: one for every image, or a list with one per image), `objective` ("ttft" |
"total"), `strict` (error instead of a missed deadline). Responses carry `usage.visual_tokens`
(the newest image's budget), `usage.visual_token_budgets` (every image's, in order),
`usage.timings_ms` (measured and predicted per stage), `usage.deadline_met` and `usage.backend`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmvr.template import IMAGE_TOKEN
from runtime.images import MAX_IMAGES, visual_text
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
    images: list[bytes]  # in order, the last the newest; one <image> placeholder each in `turns`
    options: AskOptions  # everything Pipeline.stream is asked for, checked
    stream: bool = False
    include_usage: bool = True


# ---- the request model ----------------------------------------------------------------------


class _Strict(BaseModel):
    """JSON types as sent (no "5" -> 5), and no field this server does not know."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model has one resolution


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None  # accepted and ignored


class StreamOptions(_Strict):
    include_usage: bool = True


# OpenAI fields this server does not implement -> the values that leave them off (null always does).
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "n": (1,),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": (),
}


class ChatCompletionRequest(_Strict):
    """The chat-completions body this server accepts (OpenAI's schema, less what it refuses).

    Other fields are kept aside (`model_extra`) to be refused by name: see _refuse_extras."""

    model_config = ConfigDict(strict=True, extra="allow")

    messages: list[Message]
    model: str | None = None  # one model per server: accepted and not checked
    user: str | None = None  # accepted and ignored
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # extensions (runtime.options.AskOptions)
    latency_budget_ms: float | None = None
    visual_tokens: int | list[int] | None = None
    objective: str | None = None
    strict: bool | None = None


FIELDS = tuple(ChatCompletionRequest.model_fields)
# What a top-level field must be, for the error when it is not.
EXPECTED = {
    "messages": "a non-empty list of messages",
    "model": "a string",
    "user": "a string",
    "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}',
    "max_tokens": "an integer",
    "max_completion_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "seed": "an integer",
    "stop": "a string or a list of strings",
    "latency_budget_ms": "a number of milliseconds",
    "visual_tokens": "an integer (a visual-token budget of the bundle) or a list of them, one per image",
    "objective": 'a string: "ttft" or "total"',
    "strict": "true or false",
}

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


def parse_request(
    raw: bytes | str, allow_remote: bool, max_new_tokens_limit: int, timeout_s: float | None = None
) -> ChatRequest:
    """The request body (JSON text) -> a ChatRequest whose AskOptions carry `timeout_s` (the
    server's). Any problem is an ApiError; the image is decoded (or fetched) here."""
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e) from None
    _refuse_extras(body)
    if not body.messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns, urls = _turns(body.messages)
    if not 1 <= len(urls) <= MAX_IMAGES:
        raise ApiError(
            400,
            f"this model answers about 1 to {MAX_IMAGES} images per conversation; got {len(urls)} "
            "(send each as an image_url part with a data: URI, in the user message(s), oldest first)",
            param="messages",
        )
    options = ask_options(body, max_new_tokens_limit, timeout_s)
    images = [_image_bytes(u, allow_remote) for u in urls]
    usage_too = body.stream_options.include_usage if body.stream_options else True
    return ChatRequest(turns, images, options, body.stream, usage_too)


def _refuse_extras(body: ChatCompletionRequest) -> None:
    """A 400 naming the first field this server does not know, or does not implement (unless
    it is off: null or its NOT_IMPLEMENTED value)."""
    for name, v in (body.model_extra or {}).items():
        if name not in NOT_IMPLEMENTED:
            raise ApiError(400, _unknown_field(name), param=name)
        off = NOT_IMPLEMENTED[name]
        if v is None or any(type(v) is type(o) and v == o for o in off):
            continue
        hint = f"leave it out (or send {' or '.join(map(repr, off))})" if off else "leave it out"
        msg = f"'{name}' is an OpenAI field this server does not implement (got {_short(v)}); {hint}"
        raise ApiError(400, msg, param=name)


def _invalid(e: ValidationError) -> ApiError:
    """The one most useful error of a failed validation, as a 400 naming the field."""
    errors = e.errors(include_url=False)
    for err in errors:
        if err["type"] == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON ({err['msg']})")
        if not err["loc"]:
            return ApiError(400, "the request body must be a JSON object")
    name = str(errors[0]["loc"][0])
    mine = [x for x in errors if x["loc"][0] == name]
    if mine[0]["type"] == "missing":
        return ApiError(400, f"'{name}' is required: {EXPECTED.get(name, 'a value')}", param=name)
    if name in EXPECTED and (name not in ("messages", "stream_options") or len(mine[0]["loc"]) == 1):
        got = _short(min(mine, key=lambda x: len(x["loc"]))["input"])  # the field's whole value
        return ApiError(400, f"'{name}' must be {EXPECTED[name]}, got {got}", param=name)
    err = max(mine, key=lambda x: len(x["loc"]))  # the deepest: the most specific
    path = _path(err["loc"])
    if path.endswith(".content") and err["type"] in ("string_type", "list_type"):
        msg = f"'{path}' must be a string or a list of parts (text, image_url), got {_short(err['input'])}"
        return ApiError(400, msg, param=name)
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"'{path}' is not a field this server accepts", param=name)
    return ApiError(400, f"'{path}': {err['msg']}", param=name)


def _path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url') ->
    messages[0].content[1].image_url.url (pydantic's union-member labels left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        label = not (part.isidentifier() and part.islower()) or part in ("str", "int", "float", "bool")
        repeat = out == part or out.endswith(f".{part}")  # a union's tag, then the field of that name
        if not (label or repeat):
            out += f".{part}" if out else part
    return out


def _unknown_field(name: str) -> str:
    near = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"'{name}' is not a field this server accepts{hint}; the fields are: {', '.join(FIELDS)}"


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _in_range(name: str, v: float | None, lo: float, hi: float) -> float | None:
    if v is not None and not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def ask_options(
    body: ChatCompletionRequest, max_new_tokens_limit: int, timeout_s: float | None = None
) -> AskOptions:
    """The AskOptions of a request; a bad value is a 400 naming the JSON field."""
    given: dict[str, Any] = {
        "latency_ms": body.latency_budget_ms,
        "tokens": body.visual_tokens,
        "max_new_tokens": _in_range(
            "max_completion_tokens", body.max_completion_tokens, 1, max_new_tokens_limit
        )
        or _in_range("max_tokens", body.max_tokens, 1, max_new_tokens_limit),
        "temperature": _in_range("temperature", body.temperature, 0.0, 2.0),
        "top_p": body.top_p,
        "seed": body.seed,
        "objective": body.objective,
        "strict": body.strict,
        "stop": body.stop or None,
        "timeout_s": timeout_s,
    }
    try:  # absent fields: AskOptions' defaults, the same as the CLI's and the Python API's
        return AskOptions(**{k: v for k, v in given.items() if v is not None})
    except OptionsError as e:
        name = JSON_NAMES.get(e.field, e.field)
        raise ApiError(400, f"'{name}' {e.problem}", param=name) from e


def check_context(text_tokens: int, budgets: list[int], max_new_tokens: int, context: int) -> None:
    """A 400 with the numbers when prompt + every image's visual tokens (`budgets`: one per image)
    + max_tokens exceed the model's context."""
    need = text_tokens + sum(budgets) + max_new_tokens
    if need > context:
        fewer = ", send fewer images" if len(budgets) > 1 else ""
        raise ApiError(
            400,
            f"this request needs {need} tokens of context ({text_tokens} prompt tokens + "
            f"{visual_text(budgets)} + max_tokens {max_new_tokens}); the model's context is {context} "
            f"tokens: shorten the conversation{fewer}, or lower max_tokens or visual_tokens",
            param="messages",
        )


def _turns(msgs: list[Message]) -> tuple[list[dict[str, str]], list[str]]:
    """LLaVA turns and the image URLs in order; each user message's images become `<image>`
    placeholders in front of its text, unless the texts already hold one per image."""
    turns: list[dict[str, str]] = []
    images: list[str] = []
    counts: list[int] = []  # images per turn
    for i, m in enumerate(msgs):
        if m.role in ("system", "developer"):
            continue  # the chat template carries its own system prompt
        before = len(images)
        text = _content_text(m.content, images)
        if m.role != "user" and len(images) > before:
            raise ApiError(400, f"messages[{i}]: only user messages may carry images", param="messages")
        turns.append({"from": "human" if m.role == "user" else "gpt", "value": text})
        counts.append(len(images) - before)
    _place_images(turns, counts, len(images))
    if not turns or turns[-1]["from"] != "human":
        raise ApiError(400, "the last message must be from the user", param="messages")
    for i, t in enumerate(turns):
        if t["from"] != ("human" if i % 2 == 0 else "gpt"):
            raise ApiError(400, "user and assistant messages must alternate, user first", param="messages")
    return turns, images


def _place_images(turns: list[dict[str, str]], counts: list[int], n: int) -> None:
    """Put counts[i] `<image>\\n` in front of turn i, unless the texts hold n placeholders already."""
    found = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if found == n:
        return
    if found:
        raise ApiError(
            400,
            f"the messages' text holds {found} {IMAGE_TOKEN} placeholder(s) for {n} image_url part(s): "
            f"write one {IMAGE_TOKEN} per image, or none (each image then goes before its message's text)",
            param="messages",
        )
    for t, k in zip(turns, counts):
        t["value"] = f"{IMAGE_TOKEN}\n" * k + t["value"]


def _content_text(content: str | list[TextPart | ImagePart], images: list[str]) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            url = part.image_url
            images.append(url.url if isinstance(url, ImageURL) else url)
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
        "visual_tokens": result.budget,  # the newest (last) image's budget
        "visual_token_budgets": result.budgets,  # every image's, in order
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
