"""runtime.cluster.app on a local Ray cluster: two replicas of the tiny bundle answer through the
OpenAI-compatible API, the deadline router sends a request past a busy replica, a killed replica's
requests are answered by the other. Marked slow (Ray and Serve start in ~30-60 s on 2 cores):
`make test-cluster` runs it, `make test` leaves it out."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra is not installed: make cluster")
pytestmark = pytest.mark.slow

from ray import serve  # noqa: E402

URL = "http://127.0.0.1:8123"


@pytest.fixture(scope="module")
def profiled_bundle(tmp_path_factory):
    from export import build_tiny_bundle
    from runtime.pipeline import Pipeline

    bundle = build_tiny_bundle(tmp_path_factory.mktemp("cluster") / "bundle", tokens="all", quant="fp32")
    Pipeline.load(bundle, threads=1).measure_profile(warmup=1, runs=3)
    return bundle


@pytest.fixture(scope="module")
def cluster(profiled_bundle):
    from runtime.cluster.app import build

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    app = build({"bundle": str(profiled_bundle), "replicas": 2, "threads": 1, "stats_period_s": 0.2})
    serve.run(app, name="fmvr", route_prefix="/")
    yield serve.get_deployment_handle("Replica", app_name="fmvr")
    serve.shutdown()
    ray.shutdown()


def png_uri(colour: str = "red") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(max_tokens: int = 4, latency_ms: float | None = None, timeout: float = 60) -> tuple[int, dict]:
    body: dict = {
        "model": "fmvr",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What colour is it?"}, {"type": "image_url", "image_url": {"url": png_uri()}}]}],
    }  # fmt: skip
    if latency_ms is not None:
        body["latency_budget_ms"] = latency_ms
    req = urllib.request.Request(
        URL + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start(handle, max_new_tokens: int, latency_ms: float | None = None, tokens: int | None = None):
    """A request straight to the Replica deployment (through the router): (stream, replica name)."""
    from PIL import Image

    from runtime.options import AskOptions

    opts = AskOptions(max_new_tokens=max_new_tokens, latency_ms=latency_ms, tokens=tokens)
    gen = handle.options(stream=True).stream.remote(
        [Image.new("RGB", (64, 48), "blue")], "What is it?", opts, 0.0
    )
    kind, info = next(iter(gen))
    assert kind == "start"
    return gen, info["replica"]


def replica_names(handle) -> set[str]:
    seen = set()
    for _ in range(12):
        gen, name = start(handle, 1)
        list(gen)
        seen.add(name)
    return seen


def test_two_replicas_answer_through_the_openai_api(cluster):
    status, body = chat()
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    health = json.loads(urllib.request.urlopen(URL + "/health").read())
    assert health["status"] == "ok" and health["budgets"] == [576, 144, 36, 9, 1]
    assert len(replica_names(cluster)) == 2  # both replicas serve (idle ties broken by finish time)


def test_the_deadline_router_sends_a_request_past_a_busy_replica(cluster):
    busy, name = start(cluster, 900, tokens=1)  # a long answer (~1 s), running on one replica
    try:
        for _ in range(3):  # the router counts what it sent until the replica's next statistics
            gen, other = start(cluster, 2, latency_ms=2000)
            list(gen)
            assert other != name, "a request went to the busy replica while the other was idle"
    finally:
        busy.cancel()


def test_a_killed_replica_loses_no_request(cluster):
    names = {a["name"]: a for a in ray.util.list_named_actors(all_namespaces=True) if "Replica" in a["name"]}
    assert len(names) == 2, names
    victim = ray.get_actor(next(iter(names)), namespace="serve")
    results: list[int] = []

    def client() -> None:
        for _ in range(4):
            results.append(chat(max_tokens=8, timeout=60)[0])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    ray.kill(victim, no_restart=False)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung after the replica was killed"
    assert len(results) == 12
    assert set(results) <= {200, 503}, results  # answered, or told plainly to ask again
    assert results.count(200) >= 10, results  # at most the killed replica's in-flight ones lost
    after = [chat()[0] for _ in range(4)]
    assert after == [200] * 4, after  # the other replica (and the restarted one) answer


def test_a_replica_without_a_profile_refuses_to_start_and_names_the_command(tmp_path):
    from export import build_tiny_bundle
    from runtime.cluster.app import NoProfileError, ReplicaServer

    bundle = build_tiny_bundle(tmp_path / "bundle", tokens="9", quant="fp32")
    with pytest.raises(NoProfileError, match=r"python -m runtime profile --bundle"):
        ReplicaServer(str(bundle), threads=1)
