"""An OpenAI-compatible HTTP server over a Pipeline: Starlette on uvicorn (the `serve` extra).

    pip install "fmvr-edge[serve]"
    python -m runtime serve --bundle B --host 127.0.0.1 --port 8000

POST /v1/chat/completions (text + one or more image_url data URIs; `stream: true` as server-sent events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (prometheus-client).

How a request runs. Its body is read up to max_body_bytes (413 past it) and validated by the
pydantic model of runtime.serve.api off the event loop (400 naming the field). Admission counts the
requests running or waiting: past max_concurrency + max_queue a request gets 429 at once; a
waiting one gets a slot within queue_timeout_s or a 503. The pipeline (synchronous, CPU-bound)
runs on a pool of max_concurrency threads; its text deltas reach the client through Starlette's
StreamingResponse. Everything that fails before the first token (bad image or budget, context
overflow, missed strict deadline, timeout) is a plain HTTP error, for streams too; a timeout
while decoding is a 504 (or an error event in a stream). Every error is OpenAI-style JSON and
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

try:
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Summary, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the base runtime does not carry the server's dependencies
    raise ImportError(f'the server needs its extra: pip install "fmvr-edge[serve]" ({e})') from e

from runtime.images import ContextError
from runtime.llm import GenerationTimeout, KVCacheFull, KVCacheTooSmall
from runtime.options import OptionsError
from runtime.policy import DeadlineError
from runtime.serve import api

log = logging.getLogger("runtime.serve.server")
Event = tuple[str, Any]  # ("delta", str) | ("done", Result) | ("error", ApiError), worker -> loop


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 20 * 1024 * 1024
    max_concurrency: int = 2  # requests running at once
    max_queue: int = 8  # requests waiting beyond those; more -> 429
    queue_timeout_s: float = 30.0  # waited longer than this for a slot -> 503
    timeout_s: float = 120.0  # per request, once running -> 504 (AskOptions.timeout_s)
    max_new_tokens: int = 512
    allow_remote_images: bool = False
    model_name: str = ""


class Metrics:
    """prometheus-client metrics in a registry of their own (one per server)."""

    def __init__(self, server: Server) -> None:
        r = self.registry = CollectorRegistry()
        self.responses = Counter("fmvr_http_responses", "HTTP responses by status", ["code"], registry=r)
        self.rejected = Counter("fmvr_rejected", "requests refused for load", ["reason"], registry=r)
        self.requests = Counter("fmvr_requests", "answers by visual-token budget", ["budget"], registry=r)
        self.completion_tokens = Counter("fmvr_completion_tokens", "tokens generated", registry=r)
        self.deadline = Counter("fmvr_deadline", "answers by latency budget met", ["met"], registry=r)
        self.stage_ms = Summary("fmvr_stage_ms", "measured time per stage (ms)", ["stage"], registry=r)
        r.register(_Live(server))

    def record(self, result: Any) -> None:
        self.requests.labels(budget=str(result.budget)).inc()
        self.completion_tokens.inc(len(result.token_ids))
        if result.deadline_met is not None:
            self.deadline.labels(met=str(result.deadline_met).lower()).inc()
        for stage, ms in result.measured_ms.items():
            self.stage_ms.labels(stage=stage).observe(ms)


class _Live:
    """Gauges read when scraped: admission, the pipeline's load and the policy's corrections."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Any:
        srv, pipe = self.server, self.server.pipeline
        yield GaugeMetricFamily("fmvr_requests_admitted", "requests running or queued", value=srv.admitted)
        yield GaugeMetricFamily("fmvr_requests_running", "requests holding a slot", value=srv.running)
        yield GaugeMetricFamily("fmvr_requests_inflight", "requests in the pipeline", value=pipe.inflight)
        if pipe.policy is not None:
            g = GaugeMetricFamily("fmvr_policy_correction", "measured/predicted time", labels=["part"])
            for part, c in pipe.policy.corrections(pipe.inflight).items():
                g.add_metric([part], c)
            yield g


class _CountResponses:
    """ASGI middleware: every response's status into fmvr_http_responses_total."""

    def __init__(self, app: Any, metrics: Callable[[], Metrics]) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics().responses.labels(code=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted if scope["type"] == "http" else send)


def error(e: api.ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Server:
    """The app, a bound socket (port 0 picks a free one) and uvicorn to serve it."""

    def __init__(self, pipeline: Any, cfg: ServerConfig, listen: bool = True) -> None:
        """listen=False: the app only (`self.app`), for a host that serves it itself (the
        cluster's Ray Serve ingress, runtime.cluster.app)."""
        self.pipeline, self.cfg = pipeline, cfg
        self.model = cfg.model_name or f"fmvr-{pipeline.manifest.model.get('name', 'model')}"
        self.started = time.time()
        self.admitted = 0  # running + waiting for a slot (touched on the event loop only)
        self.running = 0
        self.slots = asyncio.Semaphore(cfg.max_concurrency)
        self.pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="fmvr-pipeline")
        self.metrics = Metrics(self)
        self.app = self._app()
        self._done = threading.Event()
        if not listen:
            return
        config = uvicorn.Config(
            self.app,
            host=cfg.host,
            port=cfg.port,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.uvicorn = uvicorn.Server(config)
        self.socket = config.bind_socket()

    def _app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _server_error}
        middleware = [Middleware(_CountResponses, metrics=lambda: self.metrics)]
        return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)  # type: ignore[arg-type]

    # ---- running it ---------------------------------------------------------------------------
    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop serving (from another thread) and wait for serve_forever to return."""
        self.uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- routes ---------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        pipe = self.pipeline
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model,
                "backend": pipe.vision.name,
                "llm_provider": pipe.decoder.provider,
                "budgets": list(pipe.budgets),
                "profile": pipe.profile_note,
                "uptime_s": round(time.time() - self.started, 1),
            }
        )

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": int(self.started),
            "owned_by": "fmvr",
            "visual_token_budgets": list(self.pipeline.budgets),
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        arrived, cfg = time.perf_counter(), self.cfg
        try:
            body = await self._body(request)
            req = await run_in_threadpool(
                api.parse_request, body, cfg.allow_remote_images, cfg.max_new_tokens, cfg.timeout_s
            )
        except api.ApiError as e:
            return error(e)
        if self.admitted >= cfg.max_concurrency + cfg.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            busy = api.ApiError(429, "the server is busy (queue full); retry shortly", "rate_limit_error")
            return error(busy, {"Retry-After": "1"})
        self.admitted += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), cfg.queue_timeout_s)
        except asyncio.TimeoutError:
            self.admitted -= 1
            self.metrics.rejected.labels(reason="queue_timeout").inc()
            msg = "the server is overloaded (waited too long for a slot); retry later"
            return error(api.ApiError(503, msg, "overloaded_error"), {"Retry-After": "2"})
        except BaseException:
            self.admitted -= 1
            raise
        return await self._answer(req, arrived)

    async def _body(self, request: Request) -> bytes:
        """The body, at most max_body_bytes (413). A too-large body is read on (up to 4x the
        limit) before the answer, so that the client sees the 413 rather than a reset."""
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length", "")
        declared = int(length) if length.isdigit() else 0
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit and declared <= limit:
                chunks.append(chunk)
            elif size > 4 * limit or declared > 4 * limit:
                break
        if size <= limit and declared <= limit:
            return b"".join(chunks)
        got = f"{declared} bytes" if declared > limit else f"over {limit} bytes"
        raise api.ApiError(413, f"request body is {got}; this server accepts at most {limit}")

    # ---- one admitted request ----------------------------------------------------------------
    async def _answer(self, req: api.ChatRequest, arrived: float) -> Response:
        """Run `req` on a pipeline thread (it holds a slot); answer JSON or a stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        stop = threading.Event()  # set when the client is gone: the worker stops decoding

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        self.running += 1
        job = loop.run_in_executor(self.pool, self._work, req, arrived, put, stop)
        job.add_done_callback(self._release)
        kind, value = await events.get()
        if kind == "error":
            return error(value, {"Retry-After": "1"} if value.status == 503 else None)
        cid = api.new_id()
        if not req.stream:
            self.metrics.record(value)
            return JSONResponse(api.completion(cid, self.model, value))
        sse = self._sse(cid, req.include_usage, (kind, value), events, stop)
        return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _release(self, _job: Any) -> None:
        self.running -= 1
        self.admitted -= 1
        self.slots.release()

    async def _sse(
        self, cid: str, include_usage: bool, first: Event, events: asyncio.Queue[Event], stop: threading.Event
    ) -> AsyncIterator[str]:
        model, (kind, value) = self.model, first
        try:
            yield _event(api.chunk(cid, model, {"role": "assistant", "content": ""}))
            while kind == "delta":
                yield _event(api.chunk(cid, model, {"content": value}))
                kind, value = await events.get()
            if kind == "done":
                self.metrics.record(value)
                yield _event(api.chunk(cid, model, {}, value.finish_reason, value if include_usage else None))
            else:
                yield _event({"error": value.body()["error"]})
            yield "data: [DONE]\n\n"
        finally:
            stop.set()

    def _work(self, req: api.ChatRequest, arrived: float, put: Callable[[Event], None], stop: Any) -> None:
        """On a pipeline thread: start the answer, then send its deltas (streams) and the result."""
        waited_ms = (
            time.perf_counter() - arrived
        ) * 1e3  # reading, parsing, queueing: the deadline counts it
        try:
            ans = self._start(req, waited_ms)
        except api.ApiError as e:
            put(("error", e))
            return
        except Exception as e:  # the request boundary: report our own failure, keep serving
            log.exception("request failed")
            put(("error", api.ApiError(500, f"{type(e).__name__}: {e}", "server_error")))
            return
        try:
            for delta in ans:
                if stop.is_set():
                    return
                if req.stream:
                    put(("delta", delta))
            put(("done", ans.result))
        except GenerationTimeout as e:
            put(("error", api.ApiError(504, f"{e} (limit {self.cfg.timeout_s:g} s)", "timeout_error")))
        except KVCacheFull as e:  # the running requests hold the KV memory budget: nothing was sent
            put(("error", api.ApiError(503, str(e), "overloaded_error")))
        except KVCacheTooSmall as e:  # this request alone: max_tokens or the budget must come down
            put(("error", api.ApiError(400, str(e), param="max_tokens")))
        except api.ApiError as e:  # a remote pipeline's (runtime.cluster): its replica was lost
            put(("error", e))
        except Exception as e:  # onnxruntime's errors are plain Exceptions: report, and go on
            log.exception("request failed while decoding")
            put(("error", api.ApiError(500, f"{type(e).__name__}: {e}", "server_error")))
        finally:
            ans.close()

    def _start(self, req: api.ChatRequest, waited_ms: float) -> Any:
        """Pipeline.stream, which checks the context before any vision work (at the smallest or
        forced budgets) and after choosing (at every image's budget): an answer, or an ApiError."""
        try:
            return self.pipeline.stream(req.images, req.turns, req.options, waited_ms=waited_ms)
        except DeadlineError as e:
            raise api.ApiError(422, str(e), "deadline_error", "latency_budget_ms") from e
        except ContextError as e:  # the same numbers, in the request's field names
            api.check_context(e.text_tokens, list(e.budgets), e.max_new_tokens, e.context)
            raise api.ApiError(400, str(e), param="messages") from e
        except OptionsError as e:  # a visual_tokens list of the wrong length
            name = api.JSON_NAMES.get(e.field, e.field)
            raise api.ApiError(400, f"'{name}' {e.problem}", param=name) from e
        except ValueError as e:  # bad image, budget, profile missing
            raise api.ApiError(400, str(e)) from e


def _event(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        e = api.ApiError(404, f"no route {request.method} {request.url.path}", "not_found_error")
    else:
        e = api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return error(e, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(api.ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))


def make_server(pipeline: Any, cfg: ServerConfig) -> Server:
    """A bound server; call serve_forever() or start_in_thread()."""
    return Server(pipeline, cfg)


def start_in_thread(server: Server, timeout: float = 30.0) -> threading.Thread:
    """Serve on a daemon thread; returns once it accepts connections."""
    t = threading.Thread(target=server.serve_forever, name="fmvr-server", daemon=True)
    t.start()
    give_up = time.monotonic() + timeout
    while not server.uvicorn.started:
        if not t.is_alive() or time.monotonic() > give_up:
            raise RuntimeError(f"the server on {server.url} did not start")
        time.sleep(0.01)
    return t
