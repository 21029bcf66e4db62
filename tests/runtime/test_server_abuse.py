"""The server under abuse: malformed and nested JSON, context overflow, OpenAI fields we do not
implement, 64 concurrent clients, clients that go away; it answers each with JSON and goes on."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from runtime.serve.server import ServerConfig, make_server, start_in_thread

openai = pytest.importorskip("openai")
PROMPT = "What is in the picture?"
ROUTE = "/v1/chat/completions"


@contextmanager
def running(pipeline, **cfg):
    srv = make_server(pipeline, ServerConfig(host="127.0.0.1", port=0, **cfg))
    thread = start_in_thread(srv)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe, max_concurrency=2, max_queue=8, max_body_bytes=1_000_000) as srv:
        yield srv


def messages(image: bytes, text: str = PROMPT) -> list[dict]:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def post(server, body: dict) -> tuple[int, dict]:
    status, data = raw(server, "POST", ROUTE, json.dumps(body).encode())
    return status, json.loads(data)


def assert_error(status: int, data: bytes | dict, want: int, param: str | None = None) -> dict:
    body = json.loads(data) if isinstance(data, bytes) else data
    err = body["error"]
    assert status == want and set(err) == {"message", "type", "param", "code"} and err["code"] == want
    if param is not None:
        assert err["param"] == param and f"'{param}'" in err["message"]
    return err


def healthy(server) -> bool:
    return raw(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # a RecursionError for json.loads
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
        (b'{"messages": [], "metadata": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"messages": [1, 2', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"{}", "'messages' is required"),
        (b'{"messages": 5}', "'messages' must be"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "'messages[0].role'"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "'messages[0].content' must be"),
        (b'{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}', "input_audio"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "image_url"),
    ],
)
def test_malformed_bodies_get_400_json(server, body, match):
    status, data = raw(server, "POST", ROUTE, body)
    err = assert_error(status, data, 400)
    assert match in err["message"]
    assert healthy(server)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"visual_token": 36}, "visual_token"),  # a typo: refused, with the right name
        ({"top_k": 5}, "top_k"),
    ],
)
def test_fields_we_do_not_implement_get_400_naming_them(server, image_bytes, extra, param):
    status, body = post(server, {"messages": messages(image_bytes[0]), "max_tokens": 2, **extra})
    err = assert_error(status, body, 400, param)
    if param == "visual_token":
        assert "did you mean 'visual_tokens'" in err["message"]


def test_their_off_values_and_harmless_fields_are_accepted(server, image_bytes):
    off = {"logprobs": False, "n": 1, "presence_penalty": 0, "tools": None, "user": "u", "model": "any"}
    body = {"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1, **off}
    status, data = post(server, body)
    assert status == 200 and data["usage"]["visual_tokens"] == 1


def test_the_openai_client_gets_bad_request_for_tools(server, image_bytes):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="'tools'"):
        client.chat.completions.create(model=server.model, messages=messages(image_bytes[0]), tools=[tool])
    with pytest.raises(openai.BadRequestError, match="'response_format'"):
        client.chat.completions.create(
            model=server.model, messages=messages(image_bytes[0]), response_format={"type": "json_object"}
        )


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_a_400_with_the_numbers(server, pipe, image_bytes, stream):
    context = pipe.decoder.max_len
    text = "word " * context
    body = {
        "messages": messages(image_bytes[0], text),
        "max_tokens": 8,
        "visual_tokens": 36,
        "stream": stream,
    }
    status, data = post(server, body)
    err = assert_error(status, data, 400, None)
    prompt = len(pipe.prompt_ids(f"<image>\n{text}\n")) - 1
    msg = err["message"]
    assert err["param"] == "messages" and f"context is {context} tokens" in msg
    assert "+ 36 visual tokens + max_tokens 8" in msg
    assert int(msg.split(" prompt tokens")[0].rsplit("(", 1)[1]) in range(prompt - 2, prompt + 3)
    assert healthy(server)


def test_context_overflow_at_the_policys_budget(server, pipe, image_bytes):
    """No budget forced: the smallest budget already does not fit -> 400 before any vision work."""
    text = "word " * pipe.decoder.max_len
    status, data = post(server, {"messages": messages(image_bytes[0], text), "max_tokens": 8})
    assert "visual tokens" in assert_error(status, data, 400, None)["message"]


def test_unknown_routes_and_methods_get_json(server):
    status, data = raw(server, "GET", "/v1/nothing")
    assert "no route GET /v1/nothing" in assert_error(status, data, 404)["message"]
    status, data = raw(server, "GET", ROUTE)
    assert_error(status, data, 405)


def test_chunked_body_over_the_limit_gets_413(server):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    parts = (b"x" * 100_000 for _ in range(15))  # 1.5 MB, no Content-Length
    conn.request("POST", ROUTE, body=parts, headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert_error(r.status, r.read(), 413)
    conn.close()
    assert healthy(server)


def test_timeout_before_the_first_token_is_a_504_for_streams_too(pipe, image_bytes):
    with running(pipe, timeout_s=0.0) as srv:
        body = {"messages": messages(image_bytes[0]), "max_tokens": 20, "visual_tokens": 1, "stream": True}
        status, data = post(srv, body)
        assert "timed out" in assert_error(status, data, 504)["message"]


class Gated:
    """The real pipeline, but every request waits at a gate before it runs."""

    def __init__(self, pipe) -> None:
        self._pipe, self.gate = pipe, threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *a, **kw):
        self.gate.wait(timeout=60)
        return self._pipe.stream(*a, **kw)


def flood(srv, body: bytes, clients: int = 64) -> list:
    """`clients` connections at once; each result is a status or the exception it got."""
    results: list = [None] * clients
    start = threading.Barrier(clients)

    def call(k: int) -> None:
        start.wait()
        try:
            results[k] = raw(srv, "POST", ROUTE, body)[0]
        except Exception as e:  # a reset connection is exactly what this test looks for
            results[k] = e

    threads = [threading.Thread(target=call, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return [threads, results]


def test_64_clients_past_the_queue_get_429_or_503_never_a_reset(pipe, image_bytes):
    gated = Gated(pipe)
    body = json.dumps({"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1}).encode()
    with running(gated, max_concurrency=2, max_queue=8, queue_timeout_s=0.5) as srv:
        threads, results = flood(srv, body)
        give_up = time.monotonic() + 60
        while sum(r is not None for r in results) < 62 and time.monotonic() < give_up:
            time.sleep(0.02)  # everyone but the two holding the slots is answered while they wait
        gated.gate.set()
        for t in threads:
            t.join(timeout=60)
        assert all(isinstance(r, int) for r in results), [r for r in results if not isinstance(r, int)]
        assert results.count(200) == 2 and results.count(429) + results.count(503) == 62
        assert results.count(503) >= 8  # the queue was full, and its waiters gave up
        assert healthy(srv) and post(srv, json.loads(body))[0] == 200
        give_up = time.monotonic() + 10
        while srv.admitted and time.monotonic() < give_up:
            time.sleep(0.01)  # a slot is freed just after its answer is sent
        metrics = raw(srv, "GET", "/metrics")[1].decode()
        assert f'fmvr_rejected_total{{reason="queue_full"}} {results.count(429)}.0' in metrics
        assert "fmvr_requests_admitted 0.0" in metrics


def test_64_clients_on_the_real_pipeline(pipe, image_bytes):
    body = json.dumps({"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1}).encode()
    with running(pipe, max_concurrency=2, max_queue=8, queue_timeout_s=30) as srv:
        threads, results = flood(srv, body)
        for t in threads:
            t.join(timeout=120)
        assert all(r in (200, 429, 503) for r in results), results
        assert results.count(200) >= 10  # every admitted request is answered
        assert healthy(srv)


class Slow:
    """The real pipeline, answering one delta every 50 ms; counts the deltas it made."""

    def __init__(self, pipe) -> None:
        self._pipe, self.deltas = pipe, 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *a, **kw):
        return SlowAnswer(self, self._pipe.stream(*a, **kw))


class SlowAnswer:
    def __init__(self, owner: Slow, ans) -> None:
        self.owner, self.ans, self.budget, self.result = owner, ans, ans.budget, None

    def __iter__(self):
        for delta in self.ans:
            self.owner.deltas += 1
            time.sleep(0.05)
            yield delta
        self.result = self.ans.result

    def close(self) -> None:
        self.ans.close()


def test_a_client_that_leaves_mid_stream_stops_decoding_and_frees_its_slot(pipe, image_bytes):
    slow = Slow(pipe)
    with running(slow, max_concurrency=1, max_queue=0) as srv:
        body = {"messages": messages(image_bytes[0]), "max_tokens": 200, "visual_tokens": 1, "stream": True}
        data = json.dumps(body).encode()
        sock = socket.create_connection(srv.server_address, timeout=60)
        head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        sock.close()
        give_up = time.monotonic() + 60
        while srv.admitted and time.monotonic() < give_up:
            time.sleep(0.02)
        assert srv.admitted == 0 and slow.deltas < 100  # 200 would take 10 s
        status, got = post(srv, {"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1})
        assert status == 200 and got["usage"]["visual_tokens"] == 1


def test_metrics_are_prometheus_text(server, image_bytes):
    from prometheus_client.parser import text_string_to_metric_families

    post(server, {"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 9})
    status, data = raw(server, "GET", "/metrics")
    names = {f.name for f in text_string_to_metric_families(data.decode())}
    assert status == 200
    assert {"fmvr_http_responses", "fmvr_requests", "fmvr_stage_ms", "fmvr_requests_inflight"} <= names
