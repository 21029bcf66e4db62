"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from contextlib import contextmanager

import pytest

from runtime.serve.server import ServerConfig, make_server, start_in_thread

openai = pytest.importorskip("openai")
PROMPT = "What is in the picture?"


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


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def messages(image: bytes, text: str = PROMPT) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
            ],
        }
    ]


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def test_binds_loopback_by_default():
    assert ServerConfig().host == "127.0.0.1"


def test_chat_completion_with_the_openai_client(server, client, pipe, image_bytes):
    want = pipe.ask(image_bytes[0], PROMPT, tokens=36, max_new_tokens=8)
    r = client.chat.completions.create(
        model=server.model, messages=messages(image_bytes[0]), max_tokens=8, extra_body={"visual_tokens": 36}
    )
    assert r.choices[0].message.content == want.answer
    assert r.choices[0].finish_reason == want.finish_reason
    u = r.usage.model_dump()
    assert u["visual_tokens"] == 36 and u["completion_tokens"] == len(want.token_ids)
    assert u["backend"] == "ort-cpu" and {"vision", "prefill", "ttft"} <= set(u["timings_ms"]["measured"])


def test_streaming_with_the_openai_client(server, client, pipe, image_bytes):
    want = pipe.ask(image_bytes[1], PROMPT, tokens=144, max_new_tokens=10)
    stream = client.chat.completions.create(
        model=server.model,
        messages=messages(image_bytes[1]),
        max_tokens=10,
        stream=True,
        extra_body={"visual_tokens": 144},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.answer
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.model_dump()["visual_tokens"] == 144


def test_sse_ends_with_done(server, image_bytes):
    body = json.dumps(
        {"messages": messages(image_bytes[0]), "stream": True, "max_tokens": 3, "visual_tokens": 9}
    )
    status, data = raw(server, "POST", "/v1/chat/completions", body.encode())
    events = [line for line in data.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_concurrent_requests_get_their_own_answers(server, client, pipe, image_bytes):
    jobs = [(i % 2, t) for i, t in enumerate((576, 9, 144, 36, 1, 144))]
    want = [pipe.ask(image_bytes[i], PROMPT, tokens=t, max_new_tokens=8).answer for i, t in jobs]
    got: list = [None] * len(jobs)

    def call(k: int) -> None:
        i, t = jobs[k]
        r = client.chat.completions.create(
            model=server.model,
            messages=messages(image_bytes[i]),
            max_tokens=8,
            extra_body={"visual_tokens": t},
        )
        got[k] = r.choices[0].message.content

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == want


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    status, data = raw(server, "GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["budgets"] == [576, 144, 36, 9, 1]
    status, data = raw(server, "GET", "/metrics")
    assert status == 200 and "fmvr_http_responses_total" in data.decode()


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"messages": []}', 400, "non-empty list"),
        (b'{"messages": [{"role": "user", "content": "no image here"}]}', 400, "got 0 ("),
    ],
)
def test_bad_requests_get_400(server, body, status, match):
    got, data = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status and match in json.loads(data)["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream_options": "x"}, "stream_options"),
        ({"seed": -1}, "seed"),
        ({"latency_budget_ms": 0}, "latency_budget_ms"),
        ({"latency_budget_ms": "fast"}, "latency_budget_ms"),
        ({"visual_tokens": 0}, "visual_tokens"),
        ({"strict": "yes"}, "strict"),
        ({"objective": "fast"}, "objective"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_malformed_fields_get_400_naming_the_field(server, image_bytes, extra, param):
    body = json.dumps({"messages": messages(image_bytes[0]), **extra}).encode()
    got, data = raw(server, "POST", "/v1/chat/completions", body)
    err = json.loads(data)["error"]
    assert got == 400 and err["param"] == param and f"'{param}'" in err["message"]
    assert raw(server, "GET", "/health")[0] == 200  # and it keeps serving


def test_cli_server_and_api_build_the_same_options(pipe, tiny_bundle, image_bytes, tmp_path, monkeypatch):
    """One request, spelled for each front end, reaches Pipeline.stream as one AskOptions."""
    from runtime.__main__ import main
    from runtime.options import AskOptions
    from runtime.pipeline import Pipeline

    class Seen(Exception):
        pass

    seen = []

    def spy(self, image, prompt, options=None, *, waited_ms=0.0, **kw):
        seen.append(AskOptions.of(options, **kw))
        raise Seen  # recorded: nothing needs to run

    monkeypatch.setattr(Pipeline, "stream", spy)
    with pytest.raises(Seen):
        pipe.ask(
            image_bytes[0],
            PROMPT,
            latency_ms=120,
            objective="total",
            strict=True,
            max_new_tokens=3,
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop=["x"],
            timeout_s=60,
        )
    body = {
        "messages": messages(image_bytes[0]),
        "latency_budget_ms": 120,
        "objective": "total",
        "strict": True,
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": "x",
    }
    with running(pipe, timeout_s=60) as srv:
        assert raw(srv, "POST", "/v1/chat/completions", json.dumps(body).encode())[0] == 500  # Seen
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes[0])
    flags = "--latency-ms 120 --objective total --strict --max-new-tokens 3 --temperature 0.5 --top-p 0.9"
    flags += " --seed 7 --stop x --timeout-s 60"
    with pytest.raises(Seen):
        main(["ask", "--bundle", str(tiny_bundle), "--image", str(image), "--prompt", PROMPT, *flags.split()])
    want = AskOptions(
        latency_ms=120,
        objective="total",
        strict=True,
        max_new_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=("x",),
        timeout_s=60,
    )
    assert seen == [want, want, want]


def test_a_wide_banner_is_answered_not_refused(server, client, pipe):
    """A valid 4000x40 JPEG (over the graph's 1920x1920 maximum) is downscaled and answered."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 4000, 3), dtype=np.uint8)).save(buf, format="JPEG")
    want = pipe.ask(buf.getvalue(), PROMPT, tokens=9, max_new_tokens=4)
    r = client.chat.completions.create(
        model=server.model, messages=messages(buf.getvalue()), max_tokens=4, extra_body={"visual_tokens": 9}
    )
    assert r.choices[0].message.content == want.answer


def test_bad_image_gets_400_and_the_server_goes_on(server, client, image_bytes):
    for bad in (b"garbage bytes", image_bytes[0][:2000]):
        with pytest.raises(openai.BadRequestError, match="image"):
            client.chat.completions.create(model=server.model, messages=messages(bad), max_tokens=2)
    r = client.chat.completions.create(
        model=server.model, messages=messages(image_bytes[0]), max_tokens=2, extra_body={"visual_tokens": 1}
    )
    assert r.usage.model_dump()["visual_tokens"] == 1


def test_remote_images_are_refused_unless_enabled(server, client):
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "http://example.com/a.jpg"}},
            ],
        }
    ]
    with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
        client.chat.completions.create(model=server.model, messages=msgs, max_tokens=2)


def test_unknown_budget_and_missing_profile_get_400(server, client, image_bytes):
    with pytest.raises(openai.BadRequestError, match="valid budgets"):
        client.chat.completions.create(
            model=server.model,
            messages=messages(image_bytes[0]),
            max_tokens=2,
            extra_body={"visual_tokens": 100},
        )
    with pytest.raises(openai.BadRequestError, match="runtime profile"):
        client.chat.completions.create(
            model=server.model,
            messages=messages(image_bytes[0]),
            max_tokens=2,
            extra_body={"latency_budget_ms": 100},
        )


def test_oversize_body_gets_413_and_the_server_goes_on(server):
    status, data = raw(server, "POST", "/v1/chat/completions", b"x" * 1_500_000)
    assert status == 413 and "at most 1000000" in json.loads(data)["error"]["message"]
    assert raw(server, "GET", "/health")[0] == 200


class Gated:
    """The real pipeline, but every request waits at a gate before it runs."""

    def __init__(self, pipe) -> None:
        self._pipe, self.gate, self.entered = pipe, threading.Event(), threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *a, **kw):
        self.entered.release()
        self.gate.wait(timeout=30)
        return self._pipe.stream(*a, **kw)


def test_overload_gets_429_or_503_never_a_crash(pipe, image_bytes):
    gated = Gated(pipe)
    with running(gated, max_concurrency=1, max_queue=1, queue_timeout_s=0.5) as srv:
        body = json.dumps(
            {"messages": messages(image_bytes[0]), "max_tokens": 2, "visual_tokens": 1}
        ).encode()
        results: dict[str, int] = {}
        first = threading.Thread(
            target=lambda: results.__setitem__("first", raw(srv, "POST", "/v1/chat/completions", body)[0])
        )
        first.start()
        assert gated.entered.acquire(timeout=30)  # the first request holds the only slot
        second = threading.Thread(
            target=lambda: results.__setitem__("second", raw(srv, "POST", "/v1/chat/completions", body)[0])
        )
        second.start()
        give_up = time.monotonic() + 10
        while srv.admitted < 2 and time.monotonic() < give_up:
            time.sleep(0.01)
        status, data = raw(srv, "POST", "/v1/chat/completions", body)  # queue full
        assert status == 429 and "busy" in json.loads(data)["error"]["message"]
        second.join(timeout=30)
        assert results["second"] == 503  # waited longer than queue_timeout_s for the slot
        gated.gate.set()
        first.join(timeout=30)
        assert results["first"] == 200
        assert raw(srv, "POST", "/v1/chat/completions", body)[0] == 200  # and it still serves
        metrics = raw(srv, "GET", "/metrics")[1].decode()
        assert 'fmvr_rejected_total{reason="queue_full"} 1.0' in metrics


def test_per_request_timeout_gets_504(pipe, image_bytes):
    with running(pipe, timeout_s=0.0) as srv:
        body = json.dumps(
            {"messages": messages(image_bytes[0]), "max_tokens": 20, "visual_tokens": 1}
        ).encode()
        status, data = raw(srv, "POST", "/v1/chat/completions", body)
        assert status == 504 and "timed out" in json.loads(data)["error"]["message"]
        assert raw(srv, "GET", "/health")[0] == 200


def test_multi_turn_conversation_matches_the_pipeline(server, client, pipe, image_bytes):
    turns = [
        {"from": "human", "value": f"<image>\n{PROMPT}"},
        {"from": "gpt", "value": "A photo."},
        {"from": "human", "value": "What colour is it?"},
    ]
    want = pipe.ask(image_bytes[0], turns, tokens=9, max_new_tokens=6)
    msgs = [
        *messages(image_bytes[0]),
        {"role": "assistant", "content": "A photo."},
        {"role": "user", "content": "What colour is it?"},
    ]
    r = client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=6, extra_body={"visual_tokens": 9}
    )
    assert r.choices[0].message.content == want.answer


def test_latency_budget_picks_the_budget_and_reports_it(server, client, pipe, image_bytes, synthetic_profile):
    synthetic_profile.vision_ms = {
        t: {k: v * 1000 for k, v in d.items()} for t, d in synthetic_profile.vision_ms.items()
    }
    pipe.use_profile(synthetic_profile)  # seconds: real timings cannot move the choice
    off = pipe.prefix_cache_off()  # earlier tests asked this image: a cached prefix would (rightly) fit more
    off.__enter__()
    try:
        text = len(pipe.prompt_ids(PROMPT)) - 1
        ttft = {t: pipe.policy.predict(t, text, 4, spent_ms=0.0).ttft_ms for t in pipe.budgets}
        r = client.chat.completions.create(
            model=server.model,
            messages=messages(image_bytes[0]),
            max_tokens=4,
            extra_body={"latency_budget_ms": (ttft[9] + ttft[36]) / 2},
        )
        u = r.usage.model_dump()
        assert u["visual_tokens"] == 9
        assert u["timings_ms"]["predicted"]["ttft"] <= (ttft[9] + ttft[36]) / 2 < ttft[36]
        with pytest.raises(openai.UnprocessableEntityError, match="no budget fits"):
            client.chat.completions.create(
                model=server.model,
                messages=messages(image_bytes[0]),
                max_tokens=4,
                extra_body={"latency_budget_ms": 1, "strict": True},
            )
    finally:
        off.__exit__(None, None, None)
        pipe.reload_profile()


def test_remote_images_when_enabled(pipe, image_bytes):
    import http.server

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(image_bytes[1])))
            self.end_headers()
            self.wfile.write(image_bytes[1])

        def log_message(self, *a):
            pass

    files = http.server.HTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        with running(pipe, allow_remote_images=True) as srv:
            url = f"http://127.0.0.1:{files.server_address[1]}/photo.jpg"
            msgs = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": PROMPT},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ]
            body = json.dumps({"messages": msgs, "max_tokens": 4, "visual_tokens": 36}).encode()
            status, data = raw(srv, "POST", "/v1/chat/completions", body)
            want = pipe.ask(image_bytes[1], PROMPT, tokens=36, max_new_tokens=4).answer
            assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == want
    finally:
        files.shutdown()
        files.server_close()
