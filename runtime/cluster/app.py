"""The runtime as a Ray Serve application: replicas of the pipeline behind `runtime serve`'s API,
each request sent to the replica predicted to give it the largest budget within its deadline.

    pip install "fmvr-edge[cluster]"          # or: make cluster
    serve run runtime/cluster/serve.yaml      # a config file: bundle, replicas, threads per replica
    serve run runtime.cluster.app:build bundle=runs/demo/bundle replicas=2 threads=1
    # from Python: serve.run(runtime.cluster.app.build({"bundle": "runs/demo/bundle", "replicas": 2}))

Three parts:
- `Replica` (a deployment, N replicas): one Pipeline on its bundle and device, with its profile,
  policy and prefix cache. It refuses to start without this device's profile (the error names the
  `runtime profile` command), and reports routing statistics every --stats-period-s:
  runtime.cluster.router.ReplicaStats (its policy's p95 per budget for a nominal request, the
  learned correction per load level, the requests in flight) as a dict.
- `DeadlineRouter` (Ray Serve's RequestRouter, alpha API): for each request, the replica the
  deadline-aware rule of runtime.cluster.router.choose picks from those statistics (the largest
  budget that fits the request's latency budget, then the earliest predicted finish), with the
  replica's requests in flight taken from Serve's live queue-length cache when it has a fresh
  value, else the reported count plus what this router sent since (a stale count herds every
  request onto the replica that looked idle). The replica's own policy then
  picks the budget with the time the request has already waited, as `runtime serve` does.
- `Frontend` (the ingress): runtime.serve.server's Starlette app (the same validation, admission,
  streaming and errors) over `RemotePipeline`, which calls the replicas through a
  DeploymentHandle. A replica that dies before a request's first token: the request is retried
  once on another replica when its deadline still leaves time, else answered 503; one that dies
  while streaming ends the answer with a 503 error. Ray restarts dead replicas.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

try:
    from ray import serve
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as e:  # the base runtime does not carry Ray
    raise ImportError(f'the cluster needs its extra: pip install "fmvr-edge[cluster]" ({e})') from e

from runtime.cluster.router import DeadlineAware, ReplicaStats, ServiceTime

log = logging.getLogger("runtime.cluster")

# The nominal request whose predictions a replica reports: a short question and answer. The
# router compares replicas, so what matters is that every replica reports the same request.
NOMINAL_TEXT_TOKENS = 40
NOMINAL_NEW_TOKENS = 16
NO_DEADLINE_MS = 1e9  # a request without a latency budget: the largest budget, earliest finish


# ---- routing statistics, as they travel (plain dicts) ----------------------------------------------


def stats_dict(s: ReplicaStats, taken_at: float) -> dict[str, Any]:
    return {
        "replica": s.replica,
        "service": {str(b): [t.ttft_ms, t.decode_ms] for b, t in s.service.items()},
        "load_ratio": [dict(r) for r in s.load_ratio],
        "inflight": s.inflight,
        "taken_at": taken_at,
    }


def stats_from_dict(
    d: dict[str, Any], now: float, sent_since: int = 0, live: int | None = None
) -> ReplicaStats:
    """The statistics as the router sees them at `now`: aged; in flight, `live` (a fresh count
    of the requests on the replica) when known, else the reported count plus the requests this
    router sent since."""
    return ReplicaStats(
        replica=d["replica"],
        service={int(b): ServiceTime(*t) for b, t in d["service"].items()},
        load_ratio=tuple(d.get("load_ratio", ())),
        inflight=live if live is not None else int(d.get("inflight", 0)) + sent_since,
        age_ms=max(0.0, (now - float(d["taken_at"])) * 1e3),
    )


# ---- the replica -------------------------------------------------------------------------------------


class NoProfileError(RuntimeError):
    pass


class ReplicaServer:
    """One pipeline as a Serve replica (plain class: `Replica` is its deployment)."""

    def __init__(
        self, bundle: str, threads: int = 0, backend: str = "auto", prefix_cache_mb: int = 256
    ) -> None:
        from runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, backend=backend, threads=threads, prefix_cache_mb=prefix_cache_mb)
        if self.pipe.policy is None:
            raise NoProfileError(
                f"this replica has no device profile ({self.pipe.profile_note}), so it cannot predict "
                f"deadlines and refuses to start; measure it on this device first: "
                f"python -m runtime profile --bundle {bundle}"
            )
        try:
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a unit test)
            self.name = f"replica-{id(self):x}"

    async def stream(self, images: Any, turns: Any, options: Any, waited_ms: float) -> Any:
        """("start", {...}) once the budget is chosen and the image encoded (every error of the
        request comes before it), then ("delta", text)..., then ("done", Result)."""
        ans = await asyncio.to_thread(self.pipe.stream, images, turns, options, waited_ms=waited_ms)
        end = object()
        try:
            yield ("start", {"replica": self.name, "budget": ans.budget})
            it = iter(ans)
            while (delta := await asyncio.to_thread(next, it, end)) is not end:
                yield ("delta", delta)
            yield ("done", ans.result)
        finally:
            ans.close()

    def record_routing_stats(self) -> dict[str, Any]:
        assert self.pipe.policy is not None
        s = ReplicaStats.from_policy(
            self.name, self.pipe.policy, text_tokens=NOMINAL_TEXT_TOKENS, max_new_tokens=NOMINAL_NEW_TOKENS,
            inflight=self.pipe.inflight,
        )  # fmt: skip
        return stats_dict(s, time.time())

    def info(self) -> dict[str, Any]:
        p = self.pipe
        return {
            "replica": self.name,
            "vision": p.vision.name,
            "llm": p.decoder.provider,
            "profile": p.profile_note,
        }


# ---- the router --------------------------------------------------------------------------------------


class DeadlineRouter(FIFOMixin, RequestRouter):
    """Ray Serve's RequestRouter over runtime.cluster.router's deadline-aware rule."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.rule = DeadlineAware(seed=int(kwargs.get("seed", 0)))
        # replica -> (taken_at of the statistics it last reported, requests sent to it since)
        self.sent: dict[ReplicaID, tuple[float | None, int]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        known = [r for r in candidate_replicas if r.routing_stats.get("service")]
        if pending_request is None or not known:  # no statistics yet: any replica, Serve's order
            return [candidate_replicas]
        options = request_options(pending_request.args, pending_request.kwargs)
        deadline = getattr(options, "latency_ms", None) or NO_DEADLINE_MS
        now = time.time()
        stats = {}
        for r in known:
            taken = r.routing_stats["taken_at"]
            if self.sent.get(r.replica_id, (None, 0))[0] != taken:  # fresh statistics: they count it all
                self.sent[r.replica_id] = (taken, 0)
            live = self.live_queue(r.replica_id)
            stats[r.replica_id.unique_id] = (
                r,
                stats_from_dict(r.routing_stats, now, self.sent[r.replica_id][1], live),
            )
        budgets = sorted({b for _, s in stats.values() for b in s.service}, reverse=True)
        pick = self.rule.choose(deadline, budgets, [s for _, s in stats.values()],
                                objective=getattr(options, "objective", "ttft"))  # fmt: skip
        first = stats[pick.replica][0]
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]

    def live_queue(self, replica_id: ReplicaID) -> int | None:
        """The replica's ongoing requests as Serve's own queue-length cache knows them (its probes
        and this router's sends, seconds fresh), or None."""
        cache = getattr(self, "_replica_queue_len_cache", None)
        on = getattr(self, "_use_replica_queue_len_cache", False)
        return cache.get(replica_id) if cache is not None and on else None

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        taken, n = self.sent.get(replica_id, (None, 0))
        self.sent[replica_id] = (taken, n + 1)


def request_options(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The AskOptions of a `Replica.stream(images, turns, options, waited_ms)` call."""
    return kwargs.get("options", args[2] if len(args) > 2 else None)


# ---- the ingress ---------------------------------------------------------------------------------------


REPLICA_LOST = (RayActorError,)  # ActorDiedError and ActorUnavailableError are RayActorErrors


class ReplicaLost(Exception):
    """The replica serving a request died after its first token: the answer cannot be retried."""


@dataclass
class RemoteAnswer:
    """runtime.answer.Answer's surface (iterate deltas, `.result`, `.close()`) over a replica's stream."""

    events: Iterator[tuple[str, Any]]
    budget: int
    replica: str
    on_done: Any
    result: Any = None
    _closed: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[str]:
        try:
            for kind, value in self.events:
                if kind == "delta":
                    yield value
                elif kind == "done":
                    self.result = value
        except RayTaskError as e:  # raised while decoding (timeout, KV memory budget full): as is
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None
        except REPLICA_LOST as e:
            from runtime.serve import api

            raise api.ApiError(
                503, f"replica {self.replica} died while answering ({type(e).__name__}); ask again",
                "service_unavailable",
            ) from e  # fmt: skip
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            cancel = getattr(self.events, "cancel", None)
            if cancel is not None and self.result is None:
                cancel()
            self.on_done()


class RemotePipeline:
    """What runtime.serve.server.Server needs of a Pipeline, served by the replicas."""

    policy = None  # the replicas hold the policies; the frontend's /metrics has no corrections

    def __init__(self, handle: Any, manifest: Any, retries: int = 1) -> None:
        self.handle = handle.options(stream=True)
        self.manifest = manifest
        self.budgets = tuple(sorted(manifest.budgets, reverse=True))
        self.vision = SimpleNamespace(name="ray-serve replicas")
        self.decoder = SimpleNamespace(provider="ray-serve replicas")
        self.profile_note = "each replica's own profile"
        self.retries = retries
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return self._inflight

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def stream(self, images: Any, turns: Any, options: Any = None, *, waited_ms: float = 0.0) -> RemoteAnswer:
        """Start the answer on the replica the router picks; errors before the first token are
        raised here (as the Pipeline raises them), a lost replica retried per `retries`."""
        from runtime.serve import api

        t0 = time.perf_counter()
        with self._lock:
            self._inflight += 1
        tried: list[str] = []
        try:
            while True:
                waited = waited_ms + (time.perf_counter() - t0) * 1e3
                gen = self.handle.stream.remote(images, turns, options, waited)
                try:
                    kind, info = next(iter(gen))
                except StopIteration:
                    raise api.ApiError(
                        503, "a replica closed the answer before it began", "service_unavailable"
                    ) from None
                except RayTaskError as e:  # the request's own error (deadline, context, image): as is
                    raise (e.cause if isinstance(e.cause, BaseException) else e) from None
                except REPLICA_LOST as e:
                    tried.append(type(e).__name__)
                    left = (
                        None if options is None or options.latency_ms is None else options.latency_ms - waited
                    )
                    if len(tried) > self.retries or (left is not None and left <= 0):
                        why = "no time left before the deadline" if len(tried) <= self.retries else "retried"
                        raise api.ApiError(
                            503, f"the replica died before answering ({', '.join(tried)}; {why}); ask again",
                            "service_unavailable",
                        ) from e  # fmt: skip
                    log.warning("replica lost before the first token (%s): retrying on another", tried[-1])
                    continue
                assert kind == "start", kind
                return RemoteAnswer(gen, info["budget"], info["replica"], self._leave)
        except BaseException:
            self._leave()
            raise


class FrontendServer:
    """The ingress: runtime.serve.server's app over RemotePipeline (`Frontend` is its deployment)."""

    def __init__(self, replica: Any, bundle: str, server: dict[str, Any] | None = None) -> None:
        from runtime.bundle import read_manifest
        from runtime.serve.server import Server, ServerConfig

        self.remote = RemotePipeline(replica, read_manifest(bundle))
        self.server = Server(self.remote, ServerConfig(**(server or {})), listen=False)

    def __serve_build_asgi_app__(self) -> Any:
        return self.server.app


# ---- the application -----------------------------------------------------------------------------------


@dataclass
class ClusterConfig:
    """`serve run runtime.cluster.app:build key=value ...` or a config file's `args`."""

    bundle: str
    replicas: int = 2
    threads: int = 1  # intra-op threads per replica: replicas x threads <= the machine's cores
    backend: str = "auto"
    prefix_cache_mb: int = 256
    max_ongoing_requests: int = 4  # per replica; the policy sees them as load
    stats_period_s: float = 0.5  # how often replicas report routing statistics
    router: str = "deadline"  # deadline | power-of-two (Ray Serve's default) | round-robin
    server: dict[str, Any] = field(default_factory=dict)  # runtime.serve.server.ServerConfig fields

    def __post_init__(self) -> None:
        self.replicas, self.threads = int(self.replicas), int(self.threads)
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")


ROUTERS = {
    "deadline": "runtime.cluster.app:DeadlineRouter",
    "power-of-two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "round-robin": "runtime.cluster.app:RoundRobinRouter",
}


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """The baseline that ignores load: replicas in turn."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.turn = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        self.turn = (self.turn + 1) % len(ordered)
        first = ordered[self.turn]
        return [[first], [r for r in ordered if r is not first]]


Replica = serve.deployment(ReplicaServer, name="Replica")
Frontend = serve.deployment(serve.ingress()(FrontendServer), name="Frontend")


def build(args: dict[str, Any]) -> Any:
    """The application (Serve's application builder): `serve run` passes the key=value pairs."""
    cfg = ClusterConfig(**args)
    replica = Replica.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.threads},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTERS[cfg.router], request_routing_stats_period_s=cfg.stats_period_s
        ),
    ).bind(cfg.bundle, cfg.threads, cfg.backend, cfg.prefix_cache_mb)
    return Frontend.options(ray_actor_options={"num_cpus": 0}).bind(replica, cfg.bundle, cfg.server)
