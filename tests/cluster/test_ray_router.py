"""runtime.cluster.app's Ray pieces without a cluster: the DeadlineRouter on constructed replicas
and routing statistics, the statistics' round trip, the retry of a request whose replica died."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import NamedTuple

import pytest

pytest.importorskip("ray", reason="the cluster extra is not installed: make cluster")

from runtime.cluster.app import (  # noqa: E402
    DeadlineRouter,
    RemotePipeline,
    stats_dict,
    stats_from_dict,
)
from runtime.cluster.router import ReplicaStats, ServiceTime  # noqa: E402
from runtime.options import AskOptions  # noqa: E402


class RID(NamedTuple):  # ReplicaID's part the router reads (hashable, as Serve's is)
    unique_id: str


SERVICE = {576: ServiceTime(900.0, 80.0), 144: ServiceTime(300.0, 80.0), 9: ServiceTime(130.0, 80.0)}


def replica(name: str, inflight: int, taken_at: float | None = None) -> SimpleNamespace:
    s = ReplicaStats(name, SERVICE, inflight=inflight)
    return SimpleNamespace(
        replica_id=RID(name),
        routing_stats=stats_dict(s, time.time() if taken_at is None else taken_at),
    )


def router() -> DeadlineRouter:
    r = object.__new__(DeadlineRouter)  # RequestRouter's constructor wants a running Serve
    r.initialize_state()
    return r


def route(r: DeadlineRouter, replicas, latency_ms: float | None):
    pending = SimpleNamespace(args=([], "q", AskOptions(latency_ms=latency_ms), 0.0), kwargs={})
    return asyncio.run(r.choose_replicas(replicas, pending))


def test_statistics_round_trip_and_age():
    s = ReplicaStats(
        "a", SERVICE, load_ratio=({"ttft": 1.0, "decode": 1.0}, {"ttft": 1.8, "decode": 1.2}), inflight=2
    )
    d = stats_dict(s, taken_at=100.0)
    back = stats_from_dict(d, now=100.25, sent_since=1)
    assert back.service == SERVICE and back.load_ratio == s.load_ratio
    assert back.inflight == 3 and back.age_ms == pytest.approx(250.0)


def test_a_tight_deadline_goes_to_the_idle_replica():
    busy, idle = replica("busy", 2), replica("idle", 0)
    ranks = route(router(), [busy, idle], latency_ms=400)
    assert ranks[0] == [idle] and ranks[1] == [busy]


def test_the_router_counts_what_it_sent_until_new_statistics():
    r = router()
    a, b = replica("a", 0, taken_at=50.0), replica("b", 0, taken_at=50.0)
    first = route(r, [a, b], latency_ms=1000)[0][0]
    r.on_request_routed(None, first.replica_id, None)
    second = route(r, [a, b], latency_ms=1000)[0][0]
    assert second is not first  # the first replica now has one request the stats do not show
    first.routing_stats = {**first.routing_stats, "taken_at": 51.0}  # fresh stats count it themselves
    route(r, [a, b], latency_ms=1000)
    assert r.sent[first.replica_id] == (51.0, 0)


def test_without_statistics_every_replica_is_a_candidate():
    bare = [SimpleNamespace(replica_id=RID(n), routing_stats={}) for n in "ab"]
    assert route(router(), bare, latency_ms=100) == [bare]


class _Lost(Exception):
    pass


def test_a_replica_lost_before_the_first_token_is_retried_once(monkeypatch):
    from ray.exceptions import RayActorError

    from runtime.serve import api

    calls = []

    class Gen:
        def __init__(self, events, fail):
            self.events, self.fail = events, fail

        def __iter__(self):
            if self.fail:
                raise RayActorError()
            return iter(self.events)

    class Handle:
        def __init__(self, failures):
            self.failures = failures
            self.stream = SimpleNamespace(remote=self.remote)

        def options(self, **kw):
            return self

        def remote(self, *args):
            calls.append(args)
            fail = len(calls) <= self.failures
            return Gen([("start", {"replica": "b", "budget": 9}), ("delta", "red"), ("done", "R")], fail)

    manifest = SimpleNamespace(budgets=[576, 9], model={"name": "tiny"})
    remote = RemotePipeline(Handle(1), manifest)
    ans = remote.stream([], "q", AskOptions(latency_ms=5000))
    assert list(ans) == ["red"] and ans.result == "R" and len(calls) == 2 and remote.inflight == 0
    calls.clear()
    remote = RemotePipeline(Handle(2), manifest)  # lost twice: a clear 503, nothing hangs
    with pytest.raises(api.ApiError) as e:
        remote.stream([], "q", AskOptions(latency_ms=5000))
    assert e.value.status == 503 and "ask again" in e.value.message and remote.inflight == 0


def test_serves_live_queue_length_overrides_stale_statistics():
    r = router()
    a, b = replica("a", 0), replica("b", 1)  # the statistics say a is idle
    r._replica_queue_len_cache = {a.replica_id: 3, b.replica_id: 0}  # Serve's fresh count says otherwise
    r._use_replica_queue_len_cache = True
    assert route(r, [a, b], latency_ms=1000)[0] == [b]
