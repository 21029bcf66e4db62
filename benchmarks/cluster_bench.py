"""The cluster on this machine: deadline routing against Ray Serve's default and round robin,
then a replica killed under load.

    python benchmarks/cluster_bench.py --bundle runs/demo/bundle --replicas 2 --threads 1 --clients 4

For each router (deadline, power-of-two, round-robin) the same application (runtime.cluster.app:
--replicas replicas of --threads threads) serves --clients closed-loop clients for --seconds,
each asking about a benchmark scene through the OpenAI-compatible API with the same
`latency_budget_ms`; recorded per request: status, `usage.deadline_met` (the runtime's own
check, the frontend's wait included), `usage.visual_tokens`, the client's round trip. Then, with
the deadline router, one replica is killed (ray.kill, a real process kill; Ray restarts it)
--kill-after seconds into a --kill-seconds run: requests without an answer, errors, and the hit
rate per 10 s window. The deadline defaults to 1.3x the replicas' predicted p95 time to first
token at 144 tokens with one other request in flight (the profile of this device).
Writes benchmarks/results/cluster_bench.{json,md} (commit and command inside).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402

ROUTERS = ("deadline", "power-of-two", "round-robin")


def scene_bodies(n: int, deadline_ms: float, max_tokens: int) -> list[bytes]:
    """Requests about n val scenes of the detail benchmark (PNG data URIs, one question each)."""
    from fmvr import tasks

    out = []
    for scene in tasks.scenes("val", n, 0, "detail"):
        buf = io.BytesIO()
        tasks.render_scene(scene).save(buf, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        _, q, _ = scene.questions[0]
        body = {"model": "fmvr", "max_tokens": max_tokens, "latency_budget_ms": deadline_ms,
                "messages": [{"role": "user", "content": [{"type": "text", "text": q},
                                                          {"type": "image_url", "image_url": {"url": uri}}]}]}  # fmt: skip
        out.append(json.dumps(body).encode())
    return out


def ask(url: str, body: bytes, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    rec: dict[str, Any] = {"t": time.time()}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            usage = json.loads(r.read())["usage"]
            rec |= {"status": r.status, "met": bool(usage["deadline_met"]), "budget": usage["visual_tokens"]}
    except urllib.error.HTTPError as e:
        rec |= {"status": e.code, "met": False, "budget": 0, "error": e.read()[:200].decode(errors="replace")}
    except Exception as e:  # timeout or a dropped connection: a request without an answer
        rec |= {"status": 0, "met": False, "budget": 0, "error": f"{type(e).__name__}: {e}"}
    rec["ms"] = (time.perf_counter() - t0) * 1e3
    return rec


def load(
    url: str, bodies: list[bytes], clients: int, seconds: float, timeout: float, during=None
) -> list[dict]:
    """Closed-loop clients for `seconds`; `during(t0)` runs on its own thread meanwhile."""
    out: list[dict] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            rec = ask(url, bodies[i % len(bodies)], timeout)
            i += clients
            with lock:
                out.append(rec)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    side = threading.Thread(target=during, args=(t0,)) if during else None
    if side:
        side.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    if side:
        side.join()
    for r in out:
        r["t"] -= t0
    return out


def summary(recs: list[dict]) -> dict[str, Any]:
    ok = [r for r in recs if r["status"] == 200]
    return {
        "requests": len(recs),
        "answered": len(ok),
        "errors": {
            str(s): sum(r["status"] == s for r in recs)
            for s in sorted({r["status"] for r in recs})
            if s != 200
        },
        "hit_rate": sum(r["met"] for r in recs) / max(1, len(recs)),
        "mean_budget": statistics.mean(r["budget"] for r in ok) if ok else 0.0,
        "budgets": {
            str(b): sum(r["budget"] == b for r in ok) for b in sorted({r["budget"] for r in ok}, reverse=True)
        },
        "p50_ms": statistics.median(r["ms"] for r in ok) if ok else None,
        "p95_ms": sorted(r["ms"] for r in ok)[int(0.95 * (len(ok) - 1))] if ok else None,
    }


def default_deadline(bundle: Path) -> float:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=1)
    if pipe.policy is None:
        raise SystemExit(f"no profile for this device: python -m runtime profile --bundle {bundle}")
    return round(1.3 * pipe.policy.predict(144, 40, 8, load=1).ttft_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--deadline-ms", type=float, default=0, help="0: from the profile (module docstring)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--kill-after", type=float, default=15)
    p.add_argument("--kill-seconds", type=float, default=75)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from runtime.cluster.app import build

    deadline = a.deadline_ms or default_deadline(a.bundle)
    bodies = scene_bodies(16, deadline, a.max_tokens)
    url = f"http://127.0.0.1:{a.port}"
    ray.init(num_cpus=a.replicas * a.threads, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    runs: dict[str, Any] = {}
    timeout = max(30.0, 20 * deadline / 1e3)

    def deploy(router: str) -> None:
        app = build(
            {
                "bundle": str(a.bundle.resolve()),
                "replicas": a.replicas,
                "threads": a.threads,
                "router": router,
            }
        )
        serve.run(app, name="fmvr", route_prefix="/")
        for b in bodies[:4]:  # warm: sessions, caches, first statistics
            ask(url, b, timeout)

    try:
        for router in a.routers.split(","):
            deploy(router)
            recs = load(url, bodies, a.clients, a.seconds, timeout)
            runs[router] = summary(recs)
            print(router, json.dumps(runs[router]), flush=True)
            serve.delete("fmvr")
        deploy("deadline")
        killed: dict[str, Any] = {}

        def kill(t0: float) -> None:
            time.sleep(a.kill_after)
            names = [
                x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if "Replica" in x["name"]
            ]
            killed.update(actor=names[0], at_s=time.time() - t0)
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)

        recs = load(url, bodies, a.clients, a.kill_seconds, timeout, during=kill)
        windows = []
        for w0 in range(0, int(a.kill_seconds), 10):
            win = [r for r in recs if w0 <= r["t"] < w0 + 10]
            windows.append({"from_s": w0, **summary(win)})
        after = [r for r in recs if killed["at_s"] <= r["t"] < killed["at_s"] + 60]
        runs["kill"] = {"killed": killed, "all": summary(recs), "minute_after": summary(after),
                        "without_answer": sum(r["status"] == 0 for r in recs), "windows": windows}  # fmt: skip
        print("kill", json.dumps(runs["kill"]["all"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rec = {**run_record(), "bundle": str(a.bundle), "replicas": a.replicas, "threads": a.threads,
           "clients": a.clients, "seconds": a.seconds, "deadline_ms": deadline, "max_tokens": a.max_tokens,
           "runs": runs}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "cluster_bench.json", rec)
    write_text(a.out / "cluster_bench.md", markdown(rec))
    print(markdown(rec))
    return 0


def markdown(rec: dict[str, Any]) -> str:
    lines = [
        "# The cluster on this machine: routers side by side, then a replica killed",
        "",
        f"`{rec['command']}` (commit {rec['code']['commit'][:12]}{' dirty' if rec['code']['dirty'] else ''}). "
        f"{rec['replicas']} replicas x {rec['threads']} thread, {rec['clients']} closed-loop clients for "
        f"{rec['seconds']:g} s per router, `latency_budget_ms` {rec['deadline_ms']:g} (time to first token), "
        f"{rec['max_tokens']} new tokens.",
        "",
        "| router | requests | deadline met | mean budget | budgets | p50 / p95 round trip (ms) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ROUTERS:
        if name in rec["runs"]:
            s = rec["runs"][name]
            lines.append(
                f"| {name} | {s['requests']} | {100 * s['hit_rate']:.1f}% | {s['mean_budget']:.0f} | {s['budgets']} | "
                f"{s['p50_ms']:.0f} / {s['p95_ms']:.0f} | {s['errors'] or '-'} |"
            )
    k = rec["runs"].get("kill")
    if k:
        m = k["minute_after"]
        lines += [
            "",
            f"Replica killed at {k['killed']['at_s']:.1f} s (deadline router): {k['all']['requests']} requests, "
            f"{k['without_answer']} without an answer, errors {k['all']['errors'] or 'none'}; the minute after the "
            f"kill: {m['requests']} requests, deadline met {100 * m['hit_rate']:.1f}%, mean budget {m['mean_budget']:.0f}.",
            "",
            "| window (s) | requests | deadline met | mean budget | errors |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['from_s']}-{w['from_s'] + 10} | {w['requests']} | {100 * w['hit_rate']:.0f}% | "
            f"{w['mean_budget']:.0f} | {w['errors'] or '-'} |"
            for w in k["windows"]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
