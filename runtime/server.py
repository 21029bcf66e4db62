"""An OpenAI-compatible HTTP server over a Pipeline (standard library only: http.server).

    python -m runtime serve --bundle B --host 127.0.0.1 --port 8000

POST /v1/chat/completions (text + image_url data URI; `stream: true` as server-sent events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Limits: request body size (413), concurrency + queue (429 when the queue is full, 503 when a
queued request waited too long), per-request timeout (504); bad JSON / images -> 400. Every
error is a JSON answer and the server keeps serving.

Why the standard library: the Jetson install stays numpy + pillow + onnxruntime + tokenizers;
ThreadingHTTPServer gives one thread per connection, and onnxruntime sessions are thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from runtime import api
from runtime.llm import GenerationTimeout
from runtime.policy import DeadlineError

log = logging.getLogger("runtime.server")


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


class Limiter:
    """At most `concurrency` running and `queue` waiting; admission and slots are separate."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.slots = threading.BoundedSemaphore(concurrency)
        self.capacity = concurrency + queue
        self.lock = threading.Lock()
        self.admitted = 0
        self.running = 0

    def admit(self) -> bool:
        with self.lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.admitted -= 1


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {}

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def render(self, gauges: dict[str, float]) -> str:
        with self.lock:
            items = sorted({**self.counters, **gauges}.items())
        return "".join(f"{k} {v:g}\n" for k, v in items)


class FMVRServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, pipeline: Any, cfg: ServerConfig) -> None:
        self.pipeline, self.cfg = pipeline, cfg
        self.model = cfg.model_name or f"fmvr-{pipeline.manifest.model.get('name', 'model')}"
        self.limiter = Limiter(cfg.max_concurrency, cfg.max_queue)
        self.metrics = Metrics()
        self.started = time.time()
        super().__init__((cfg.host, cfg.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: FMVRServer
    server_version = "fmvr-runtime/0.1"
    timeout = 30  # seconds a client may stall mid-request before its socket is closed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.info("%s %s", self.address_string(), format % args)

    # ---- plumbing --------------------------------------------------------------------------------
    def _send(
        self, status: int, body: Any, ctype: str = "application/json", headers: dict | None = None
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.server.metrics.inc("fmvr_http_responses_total", code=status)

    def _error(self, e: api.ApiError, headers: dict | None = None) -> None:
        self._send(e.status, e.body(), headers=headers)

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise api.ApiError(411, "a Content-Length header is required")
        n, limit = int(length), self.server.cfg.max_body_bytes
        if n > limit:
            self.close_connection = True
            if n <= 4 * limit:  # drain so the client sees the answer, not a reset
                self.rfile.read(n)
            raise api.ApiError(413, f"request body is {n} bytes; this server accepts at most {limit}")
        try:
            return json.loads(self.rfile.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.ApiError(400, f"the request body is not valid JSON ({e})") from e

    # ---- routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        srv = self.server
        if self.path == "/health":
            pipe = srv.pipeline
            health = {
                "status": "ok",
                "model": srv.model,
                "backend": pipe.vision.name,
                "llm_provider": pipe.decoder.provider,
                "budgets": list(pipe.budgets),
                "profile": pipe.profile_note,
                "uptime_s": round(time.time() - srv.started, 1),
            }
            self._send(200, health)
        elif self.path == "/v1/models":
            card = {
                "id": srv.model,
                "object": "model",
                "created": int(srv.started),
                "owned_by": "fmvr",
                "visual_token_budgets": list(srv.pipeline.budgets),
            }
            self._send(200, {"object": "list", "data": [card]})
        elif self.path == "/metrics":
            self._send(200, self._metrics().encode(), "text/plain; version=0.0.4")
        else:
            self._error(api.ApiError(404, f"no route GET {self.path}", "not_found_error"))

    def _metrics(self) -> str:
        srv = self.server
        lim = srv.limiter
        gauges = {"fmvr_requests_admitted": float(lim.admitted), "fmvr_requests_running": float(lim.running)}
        if srv.pipeline.policy is not None:
            load = srv.pipeline.inflight
            gauges["fmvr_requests_inflight"] = float(load)
            for part, c in srv.pipeline.policy.corrections(load).items():
                gauges[f'fmvr_policy_correction{{part="{part}"}}'] = c
        return srv.metrics.render(gauges)

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        if self.path != "/v1/chat/completions":
            self._error(api.ApiError(404, f"no route POST {self.path}", "not_found_error"))
            return
        srv, arrived = self.server, time.perf_counter()
        try:
            cfg = srv.cfg
            req = api.parse_request(self._body(), cfg.allow_remote_images, cfg.max_new_tokens, cfg.timeout_s)
        except api.ApiError as e:
            self._error(e)
            return
        if not srv.limiter.admit():
            srv.metrics.inc("fmvr_rejected_total", reason="queue_full")
            busy = api.ApiError(429, "the server is busy (queue full); retry shortly", "rate_limit_error")
            self._error(busy, {"Retry-After": "1"})
            return
        try:
            self._admitted(req, arrived)
        except Exception as e:  # the request boundary: report our own failure, keep serving
            log.exception("request failed")
            if not getattr(self, "_started_stream", False):
                self._error(api.ApiError(500, f"{type(e).__name__}: {e}", "server_error"))
        finally:
            srv.limiter.leave()

    def _admitted(self, req: api.ChatRequest, arrived: float) -> None:
        srv, lim = self.server, self.server.limiter
        if not lim.slots.acquire(timeout=srv.cfg.queue_timeout_s):
            srv.metrics.inc("fmvr_rejected_total", reason="queue_timeout")
            msg = "the server is overloaded (waited too long for a slot); retry later"
            self._error(api.ApiError(503, msg, "overloaded_error"), {"Retry-After": "2"})
            return
        with lim.lock:
            lim.running += 1
        try:
            self._run(req, arrived)
        finally:
            with lim.lock:
                lim.running -= 1
            lim.slots.release()

    def _run(self, req: api.ChatRequest, arrived: float) -> None:
        srv, cid = self.server, api.new_id()
        waited_ms = (
            time.perf_counter() - arrived
        ) * 1e3  # reading the body + the queue: the deadline counts it
        try:
            ans = srv.pipeline.stream(req.image, req.turns, req.options, waited_ms=waited_ms)
        except DeadlineError as e:
            self._error(api.ApiError(422, str(e), "deadline_error", "latency_budget_ms"))
            return
        except ValueError as e:  # bad image, budget, prompt, profile missing
            self._error(api.ApiError(400, str(e)))
            return
        self._started_stream = False
        try:
            if req.stream:
                self._stream(cid, ans, req.include_usage)
            else:
                for _ in ans:
                    pass
                self._send(200, api.completion(cid, srv.model, ans.result))
        except GenerationTimeout as e:
            if req.stream:
                self._event({"error": api.ApiError(504, str(e), "timeout_error").body()["error"]})
                self._event("[DONE]")
            else:
                self._error(api.ApiError(504, f"{e} (limit {srv.cfg.timeout_s:g} s)", "timeout_error"))
            return
        except Exception as e:  # onnxruntime's errors are plain Exceptions: report, and go on
            log.exception("request %s failed", cid)
            if self._started_stream:
                self._event({"error": api.ApiError(500, str(e), "server_error").body()["error"]})
                self._event("[DONE]")
            else:
                self._error(api.ApiError(500, f"{type(e).__name__}: {e}", "server_error"))
            return
        finally:
            ans.close()
        self._record(ans.result)

    def _event(self, data: Any) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    def _stream(self, cid: str, ans: Any, include_usage: bool) -> None:
        model = self.server.model
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._started_stream = True
        self.server.metrics.inc("fmvr_http_responses_total", code=200)
        self._event(api.chunk(cid, model, {"role": "assistant", "content": ""}))
        for delta in ans:
            self._event(api.chunk(cid, model, {"content": delta}))
        r = ans.result
        self._event(api.chunk(cid, model, {}, r.finish_reason, r if include_usage else None))
        self._event("[DONE]")

    def _record(self, r: Any) -> None:
        if r is None:
            return
        m = self.server.metrics
        m.inc("fmvr_requests_total", budget=r.budget)
        m.inc("fmvr_completion_tokens_total", len(r.token_ids))
        if r.deadline_met is not None:
            m.inc("fmvr_deadline_total", met=str(r.deadline_met).lower())
        for stage, ms in r.measured_ms.items():
            m.inc("fmvr_stage_ms_sum", ms, stage=stage)
        m.inc("fmvr_stage_ms_count")


def make_server(pipeline: Any, cfg: ServerConfig) -> FMVRServer:
    """A bound server (port 0 picks a free one); call serve_forever() or start_in_thread()."""
    return FMVRServer(pipeline, cfg)


def start_in_thread(server: FMVRServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="fmvr-server", daemon=True)
    t.start()
    return t
