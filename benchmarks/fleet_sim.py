"""A fleet of runtime replicas in simulation: deadline-aware routing against round robin and Ray
Serve's default (power of two choices), 1 to 64 replicas, up to 1,000 closed-loop clients (#29).

    python benchmarks/fleet_sim.py                      # the sweep below (~1-2 min on one core)
    python benchmarks/fleet_sim.py --replicas 2 --staleness-ms 0 --requests 400   # a quick look

Discrete events (heapq) on simulated time; the routers are runtime.cluster.router's own code.

Service times, measured: a device profile as `python -m runtime profile` writes it
(`--profile bundle/profile-<device>.json`; else the first `profile-*.json` under runs/*/bundle),
or, when there is none, the committed latency result (`--latency-result`, default
benchmarks/results/latency_small/latency.json: median TTFT, vision and prefill per budget), with
decoding and the prefix cache's follow-up TTFT from benchmarks/results/decoder_speed_small.json.
The router sees a Policy built from that profile (from the latency result: vision per budget, the
prefill line fitted through its points) and warmed on WINDOW requests drawn from the service
distribution, so its predictions are the runtime's p95 ones; the replicas draw each request's
time from the measured medians x a lognormal (sigma from the measurement's spread) with a slow
tail (from the misses the measured policy run saw). Which files drove a run is in its JSON.

Replicas: one worker each, first come first served; an LRU prefix cache per replica
(runtime.prefix_cache's default size; a follow-up question about the same frame at the same
budget skips vision and the prefix's prefill). Who picks the budget (--budget-by): "replica", the
replica's own policy when the request starts, with the time it waited counted against the
deadline and without looking at the prefix cache (as runtime.pipeline does today); "router", the
router's budget, served as forced `tokens`. Either way every router gets the same budget rule,
so only the replica choice differs. The router sees each
replica's in-flight count and predicted backlog as of `--staleness-ms` ago (what a router's
statistics look like when replicas push them periodically: Ray Serve's routing statistics every
10 s by default, a mean age of 5 s; or when a probe's answer is cached). There is a proxy, with
its own router, per --replicas-per-proxy replicas (Ray Serve: one per node), each client talks
to one; with "+local" a router also counts the requests its proxy sent since the report (what
Ray's queue-length cache does), but not the other proxies'.
Prefix-cache contents are seen as they are now (a follow-up comes seconds after the first answer).

Clients: closed loop, each waits for its answer, thinks (exponential, mean set so that the offered
load is --load of the fleet's capacity at the budgets an idle replica would give), then asks
again; a deadline class per question (tight / medium / loose: --slack x the p95 time to first
token of 36 / 144 / 576 tokens on an idle replica), a follow-up about the same frame with
probability --follow-up. The deadline is on the time to first token, from the question's issue.
Writes <out>/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmvr.atomic import write_json, write_text  # noqa: E402
from fmvr.provenance import run_record  # noqa: E402
from runtime.cluster.router import (  # noqa: E402
    ROUTERS,
    ReplicaStats,
    RoundRobin,
    RouteChoice,
    fit,
)
from runtime.policy import WINDOW, Policy  # noqa: E402
from runtime.prefix_cache import DEFAULT_MB  # noqa: E402
from runtime.profile import Profile, fit_line  # noqa: E402

BUDGETS = (576, 144, 36, 9, 1)
# runtime/tools/latency.py's PROMPT in the small preset's ChatML template, counted with its
# tokenizer (fmvr.tokenizer.prompt_ids): 47 text tokens, 24 before the image, 23 after it.
TEXT_TOKENS, SUFFIX_TOKENS, PREFIX_TOKENS = 47, 23, 24
# KV bytes per prompt position of the small preset's LM (SmolLM2-135M: 30 layers x 3 KV heads x
# 64 x (k, v) x fp32), as runtime.prefix_cache's "a 576-token prefix is ~28 MB" says.
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
CLASSES = {"tight": 36, "medium": 144, "loose": 576}  # deadline class -> the budget it is sized on
LATENCY_RESULT = ROOT / "benchmarks/results/latency_small/latency.json"
DECODER_RESULT = ROOT / "benchmarks/results/decoder_speed_small.json"


# ---- the service-time model ---------------------------------------------------------------------


@dataclass
class ServiceModel:
    """What a request costs on a replica (truth, drawn per request) and what the router predicts."""

    ttft_ms: dict[int, float]  # median time to first token per budget (measured)
    decode_ms_per_token: float
    hit_ttft_ms: float  # median TTFT of a follow-up whose frame prefix is cached
    sigma: float  # lognormal spread of every draw
    tail_p: float  # probability of a slow request ...
    tail_factor: float  # ... that takes this many times its draw
    profile: Profile  # what the router's Policy predicts from
    source: dict[str, Any] = field(default_factory=dict)

    def draw(self, rng: random.Random, median: float) -> float:
        x = median * rng.lognormvariate(0.0, self.sigma)
        return x * self.tail_factor if rng.random() < self.tail_p else x


def _rel(path: Path | str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def model_from_profile(path: Path, decoder: dict | None, sigma: float | None) -> ServiceModel:
    """A device profile as `runtime profile` saves it: the truth is its own prediction (medians)."""
    prof = Profile.from_dict(json.loads(path.read_text()))
    pol = Policy(prof, BUDGETS)
    ttft = {b: pol.predict(b, TEXT_TOKENS, 0).ttft_ms for b in BUDGETS}
    spread = [math.log(v["p90"] / v["p50"]) / 1.2816 for v in prof.vision_ms.values() if v.get("p90")]
    hit = pol.predict(BUDGETS[0], SUFFIX_TOKENS, 0)
    hit_ttft = hit.stages["preprocess"] + prof.prefill(SUFFIX_TOKENS)
    src: dict[str, Any] = {"profile": _rel(path), "sigma_from": "vision p90/p50 of the profile (median)"}
    if decoder is not None:
        hit_ttft, src["hit_ttft_from"] = decoder["prefix_cache"]["follow_up_ttft_ms"], decoder["_path"]
    return ServiceModel(
        ttft,
        prof.decode_ms_per_token,
        hit_ttft,
        sigma if sigma is not None else statistics.median(spread or [0.05]),
        0.0,
        1.0,
        prof,
        src,
    )


def model_from_results(latency_path: Path, decoder: dict, sigma: float | None) -> ServiceModel:
    """No profile on disk: the committed latency result (per-budget medians) and decoder speed."""
    lat = json.loads(latency_path.read_text())
    rows = {r["budget"]: r for r in lat["ttft"]}
    ttft = {b: float(rows[b]["ttft_ms"]) for b in BUDGETS}
    intercept, slope = fit_line([(TEXT_TOKENS + b, float(rows[b]["prefill_ms"])) for b in BUDGETS])
    pre = max(
        0.0,
        statistics.median(rows[b]["ttft_ms"] - rows[b]["vision_ms"] - rows[b]["prefill_ms"] for b in BUDGETS),
    )
    decode = float(decoder.get("shared", decoder["copy"])["decode_ms_per_token"])
    prof = Profile(
        device={k: v for k, v in lat["device"].items() if k != "key"},
        backend=lat["backend"],
        vision_ms={b: {"p50": float(rows[b]["vision_ms"]), "n": 1} for b in BUDGETS},
        prefill_intercept_ms=intercept,
        prefill_ms_per_token=slope,
        decode_ms_per_token=decode,
        preprocess_ms=pre,
    )
    # spread: a fixed budget at one client whose deadline fell inside its distribution puts the
    # deadline at the met-fraction's quantile: sigma = ln(deadline / p50) / z(met); the largest
    # estimate. Tail: the policy's own run at one client: the misses took >= deadline / p50.
    from statistics import NormalDist

    one = next(load for load in lat["load"] if load["concurrency"] == 1)
    fixed = [r for r in one["runs"] if r["config"].startswith("fixed") and 0 < r["met_fraction"] < 1]
    est = [
        math.log(r["deadline_ms"] / r["p50_ttft_ms"]) / NormalDist().inv_cdf(r["met_fraction"]) for r in fixed
    ]
    missed = [r for r in one["runs"] if r["config"] == "policy" and r["met_fraction"] < 1]
    tail_p = 1 - missed[0]["met_fraction"] if missed else 0.0
    tail_f = missed[0]["deadline_ms"] / missed[0]["p50_ttft_ms"] if missed else 1.0
    src = {
        "latency_result": _rel(latency_path),
        "decoder_result": decoder["_path"],
        "profile": "none on disk: built from the latency result (vision per budget, prefill line over "
        f"{TEXT_TOKENS} text tokens + budget) and the decoder result's decode ms/token",
        "sigma_estimates": [round(s, 4) for s in est],
        "sigma_from": "fixed-budget runs at 1 client with 0 < met < 1: ln(deadline / p50) / z(met), the largest",
        "tail_from": "the policy run at 1 client that missed: 1 - met, deadline / p50",
        "hit_ttft_from": decoder["_path"],
    }
    return ServiceModel(
        ttft,
        decode,
        float(decoder["prefix_cache"]["follow_up_ttft_ms"]),
        sigma if sigma is not None else max(est or [0.05]),
        tail_p,
        tail_f,
        prof,
        src,
    )


def warm_policy(model: ServiceModel, new_tokens: int, rng: random.Random) -> Policy:
    """The router's Policy after WINDOW requests at load 0 drawn from the service distribution:
    its corrections are the p95 of measured / profiled, as on a replica that has been serving."""
    pol = Policy(model.profile, BUDGETS)
    for i in range(WINDOW):
        b = BUDGETS[i % len(BUDGETS)]
        raw = pol.raw(b, TEXT_TOKENS, new_tokens)
        f = (model.draw(rng, model.ttft_ms[b]) - raw["preprocess"]) / (raw["vision"] + raw["prefill"])
        d = model.draw(rng, model.decode_ms_per_token * new_tokens) / max(raw["decode"], 1e-9)
        measured = {"vision": raw["vision"] * f, "prefill": raw["prefill"] * f, "decode": raw["decode"] * d}
        pol.observe(b, TEXT_TOKENS, new_tokens, measured, load=0)
    return pol


# ---- the fleet -------------------------------------------------------------------------------------


def replica_budget(stats0: ReplicaStats, deadline_ms: float, waited_ms: float) -> int:
    """The budget a replica's own policy picks when the request starts, `waited_ms` after its
    issue (the server counts queueing against the deadline; runtime.pipeline chooses before it
    looks the prefix up, so without the cache): the router's per-replica rule with the wait."""
    f = fit(ReplicaStats("here", stats0.service, backlog_ms=waited_ms), deadline_ms, BUDGETS)
    assert f is not None
    return f.budget


@dataclass(slots=True)
class Job:
    rid: int
    client: int
    issued: float
    deadline_ms: float
    klass: str
    follow_up: bool
    frame: str  # the frame's prefix key is frame:budget
    choice: RouteChoice
    pred_ms: float  # predicted total (the replica's own prediction of the work it holds)
    start: float = 0.0
    budget: int = 0  # served at


class Replica:
    """One worker, first come first served, an LRU prefix cache, and the history of what it
    reported (time, in flight, predicted backlog) for stale views."""

    def __init__(self, i: int, cache_bytes: int) -> None:
        self.i, self.name = i, f"r{i}"
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.queued_ms = 0.0
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.cache_bytes, self.cache_used = cache_bytes, 0
        self.hist_t, self.hist_n, self.hist_b = [0.0], [0], [0.0]

    def inflight(self) -> int:
        return len(self.queue) + (self.current is not None)

    def backlog(self, now: float) -> float:
        cur = self.current
        left = max(0.0, cur.pred_ms - (now - cur.start)) if cur is not None else 0.0
        return self.queued_ms + left

    def record(self, now: float) -> None:
        self.hist_t.append(now)
        self.hist_n.append(self.inflight())
        self.hist_b.append(self.backlog(now))

    def put(self, key: str, nbytes: int) -> None:
        if nbytes > self.cache_bytes:
            return
        old = self.cache.pop(key, None)
        self.cache_used -= old or 0
        while self.cache and self.cache_used + nbytes > self.cache_bytes:
            self.cache_used -= self.cache.popitem(last=False)[1]
        self.cache[key] = nbytes
        self.cache_used += nbytes


class View(Sequence[ReplicaStats]):
    """The fleet as one proxy's router sees it at `now`: each replica's report as of
    `staleness_ms` ago (+ with `local`, the proxy's own sends since). Built lazily: a baseline
    reads one or two replicas."""

    def __init__(self, fleet: Fleet, proxy: int, now: float) -> None:
        self.fleet, self.proxy, self.now = fleet, proxy, now

    def __len__(self) -> int:
        return len(self.fleet.replicas)

    def __getitem__(self, i: int) -> ReplicaStats:  # type: ignore[override]
        return self.fleet.stats(i, self.proxy, self.now)

    def __iter__(self) -> Iterator[ReplicaStats]:
        return (self.fleet.stats(i, self.proxy, self.now) for i in range(len(self.fleet.replicas)))


class Fleet:
    """The replicas, and what the proxies' routers see of them."""

    def __init__(
        self, n: int, proxies: int, stats0: ReplicaStats, staleness_ms: float, local: bool, cache_bytes: int
    ) -> None:
        self.replicas = [Replica(i, cache_bytes) for i in range(n)]
        self.stats0, self.staleness, self.local = stats0, staleness_ms, local
        # per proxy and replica: (time, predicted ms) of the proxy's sends not yet in a report
        self.sent: list[list[deque[tuple[float, float]]]] = [
            [deque() for _ in range(n)] for _ in range(proxies)
        ]

    def stats(self, i: int, proxy: int, now: float) -> ReplicaStats:
        r, s0 = self.replicas[i], self.stats0
        asof = now - self.staleness
        j = bisect.bisect_right(r.hist_t, asof) - 1
        n, backlog, t = r.hist_n[j], r.hist_b[j], r.hist_t[j]
        if self.local and self.staleness > 0:
            sent = self.sent[proxy][i]
            while sent and sent[0][0] <= asof:  # already in the report
                sent.popleft()
            for ts, ms in sent:  # one worker, first come first served: drain, then add each send
                backlog, t = max(0.0, backlog - (ts - t)) + ms, ts
            n += len(sent)
        return ReplicaStats(r.name, s0.service, s0.load_ratio, n, backlog, r.cache.keys(), s0.cached, now - t)


def simulate(
    model: ServiceModel,
    stats0: ReplicaStats,
    *,
    replicas: int,
    clients: int,
    think_ms: float,
    deadlines: dict[str, float],
    mix: dict[str, float],
    router: str,
    staleness_ms: float,
    local: bool,
    proxies: int,
    budget_by: str,
    requests: int,
    warmup: float,
    new_tokens: int,
    follow_up: float,
    cache_mb: float,
    seed: int,
) -> dict[str, Any]:
    """One closed-loop run; returns its measured numbers (requests after the warm-up)."""
    rng = random.Random(f"{seed}:{replicas}:{clients}")  # the workload and the service draws
    # a router per proxy; client c talks to proxy c % proxies
    routes = [ROUTERS[router](seed + p) for p in range(proxies)]
    for p, rt in enumerate(routes):
        if isinstance(rt, RoundRobin):
            rt.next = p * replicas // proxies  # the proxies' cycles out of step
    fleet = Fleet(replicas, proxies, stats0, staleness_ms, local, int(cache_mb * 2**20))
    classes, weights = list(mix), list(mix.values())
    total = math.ceil(requests / (1 - warmup))
    skip = total - requests
    # (time, seq, kind, who): kind 0, client `who` asks; kind 1, replica `who` finishes
    events: list[tuple[float, int, int, int]] = []
    seq = 0
    frames = [0] * clients  # each client's current frame
    issued = answered = 0
    done = [False] * total
    # per measured request: class, budget, met, prefix hit, follow-up, ttft, predicted met by the router
    rows: list[tuple[str, int, bool, bool, bool, float, bool]] = []
    decode_med = model.decode_ms_per_token * new_tokens
    busy = [0.0]  # service ms of the measured requests
    for c in range(clients):
        heapq.heappush(events, (rng.expovariate(1 / think_ms), seq, 0, c))
        seq += 1

    def start(r: Replica, now: float) -> None:
        nonlocal seq
        job = r.queue.popleft()
        r.queued_ms -= job.pred_ms
        b = (
            job.choice.budget
            if budget_by == "router"
            else replica_budget(stats0, job.deadline_ms, now - job.issued)
        )
        key = f"{job.frame}:{b}"
        hit = key in r.cache
        if hit:
            r.cache.move_to_end(key)
        ttft = model.draw(rng, model.hit_ttft_ms if hit else model.ttft_ms[b])
        service = ttft + model.draw(rng, decode_med)
        job.start, job.budget, r.current = now, b, job
        if budget_by == "replica":  # what it holds now, by its own prediction
            job.pred_ms = (stats0.cached if hit else stats0.service)[b].total_ms
        r.record(now)
        if job.rid >= skip:
            busy[0] += service
            met = now + ttft - job.issued <= job.deadline_ms
            rows.append((job.klass, b, met, hit, job.follow_up, now + ttft - job.issued, job.choice.met))
        heapq.heappush(events, (now + service, seq, 1, r.i))
        seq += 1

    t_first = t_last = 0.0
    while events:
        now, _, kind, who = heapq.heappop(events)
        if kind == 0:  # client `who` asks
            if issued >= total:
                continue
            rid, issued = issued, issued + 1
            if rid == skip:
                t_first = now
            fu = frames[who] > 0 and rng.random() < follow_up
            if not fu:
                frames[who] += 1
            klass = rng.choices(classes, weights)[0]
            deadline = deadlines[klass]
            keys = {b: f"{who}:{frames[who]}:{b}" for b in BUDGETS} if fu else None
            proxy = who % proxies
            choice = routes[proxy].choose(deadline, BUDGETS, View(fleet, proxy, now), prefix_keys=keys)
            i = int(choice.replica[1:])
            pred = (stats0.cached if choice.prefix_hit else stats0.service)[choice.budget].total_ms
            job = Job(rid, who, now, deadline, klass, fu, f"{who}:{frames[who]}", choice, pred)
            r = fleet.replicas[i]
            r.queue.append(job)
            r.queued_ms += pred
            if local:
                fleet.sent[proxy][i].append((now, pred))
            if r.current is None:
                start(r, now)
            else:
                r.record(now)
        else:  # replica `who` finished its current job
            r = fleet.replicas[who]
            cur = r.current
            assert cur is not None
            job = cur
            if done[job.rid]:
                raise AssertionError(f"request {job.rid} answered twice")
            done[job.rid], answered = True, answered + 1
            r.put(f"{job.frame}:{job.budget}", KV_BYTES_PER_TOKEN * (PREFIX_TOKENS + job.budget))
            r.current = None
            if job.rid >= skip:
                t_last = now
            heapq.heappush(events, (now + rng.expovariate(1 / think_ms), seq, 0, job.client))
            seq += 1
            if r.queue:
                start(r, now)
            else:
                r.record(now)
    span = max(t_last - t_first, 1e-9)
    met = [x[2] for x in rows]
    ttfts = sorted(x[5] for x in rows)
    fus = [x for x in rows if x[4]]
    out: dict[str, Any] = {
        "replicas": replicas,
        "clients": clients,
        "staleness_ms": staleness_ms,
        "router": router + ("+local" if local else ""),
        "proxies": proxies,
        "budget_by": budget_by,
        "requests": len(rows),
        "issued": issued,
        "answered": answered,
        "answered_once": answered == issued and all(done),
        "hit_rate": round(sum(met) / len(rows), 4),
        "mean_budget": round(sum(x[1] for x in rows) / len(rows), 2),
        "predicted_met": round(sum(x[6] for x in rows) / len(rows), 4),
        "p50_ttft_ms": round(ttfts[len(ttfts) // 2], 1),
        "p95_ttft_ms": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
        "throughput_rps": round(len(rows) / span * 1e3, 2),
        "utilization": round(busy[0] / (replicas * span), 3),  # of the measured requests, over their span
        "follow_ups": len(fus),
        "prefix_hits": round(sum(x[3] for x in fus) / len(fus), 3) if fus else None,
        "by_class": {},
        "budgets": {b: sum(x[1] == b for x in rows) for b in BUDGETS},
    }
    for k in classes:
        xs = [x for x in rows if x[0] == k]
        if xs:
            out["by_class"][k] = {
                "n": len(xs),
                "hit_rate": round(sum(x[2] for x in xs) / len(xs), 4),
                "mean_budget": round(sum(x[1] for x in xs) / len(xs), 2),
            }
    return out


# ---- the sweep -----------------------------------------------------------------------------------


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def parse_mix(s: str) -> dict[str, float]:
    mix = {k: float(v) for k, v in (p.split(":") for p in s.split(","))}
    if set(mix) - set(CLASSES) or not sum(mix.values()) > 0:
        raise SystemExit(f"--mix: classes among {list(CLASSES)} with positive weights, got {s!r}")
    return mix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--profile", type=Path, help="a device profile JSON (profile-<device>.json); default: runs/*/bundle/")
    a("--latency-result", type=Path, default=LATENCY_RESULT, help="used when there is no profile")
    a(
        "--decoder-result",
        type=Path,
        default=DECODER_RESULT,
        help="decode ms/token, prefix-cache follow-up TTFT",
    )
    a("--replicas", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="fleet sizes, comma-separated")
    a(
        "--staleness-ms",
        type=floats,
        default=[0.0, 100.0, 1000.0, 5000.0],
        help="router statistics' age, comma-separated",
    )
    a("--routers", default="round_robin,power_of_two,deadline,deadline_spread", help=f"among {list(ROUTERS)}")
    a(
        "--local",
        default="power_of_two,deadline_spread",
        help="routers also run with their own sends counted (+local)",
    )
    a(
        "--budget-by",
        type=lambda s: [x for x in s.split(",") if x in ("replica", "router")] or ["replica"],
        default=["replica", "router"],
        help="who picks the budget: the replica's policy when the request starts, with the time it "
        "waited (as the runtime does), or the router (served at it, `tokens=`); comma-separated",
    )
    a(
        "--replicas-per-proxy",
        type=int,
        default=8,
        help="a proxy (with its own router) per this many replicas",
    )
    a("--clients-per-replica", type=int, default=15)
    a("--max-clients", type=int, default=1000)
    a("--load", type=float, default=0.85, help="offered load / capacity at an idle replica's budgets")
    a("--mix", type=parse_mix, default=parse_mix("tight:0.4,medium:0.3,loose:0.3"))
    a("--slack", type=float, default=1.5, help="deadline = slack x p95 TTFT of the class's budget, idle")
    a("--new-tokens", type=int, default=8, help="tokens decoded per answer")
    a("--follow-up", type=float, default=0.3, help="probability that a question is about the previous frame")
    a("--cache-mb", type=float, default=DEFAULT_MB, help="prefix cache per replica")
    a("--requests", type=int, default=3000, help="measured requests per run (after the warm-up)")
    a("--warmup", type=float, default=0.15, help="fraction of the issued requests not measured")
    a("--sigma", type=float, help="lognormal spread of service times (default: from the measurement)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=ROOT / "benchmarks/results")
    a("--name", default="fleet_sim")
    a("--no-plot", action="store_true")
    return p


def load_model(args: argparse.Namespace) -> ServiceModel:
    decoder = None
    if args.decoder_result and Path(args.decoder_result).is_file():
        decoder = {**json.loads(Path(args.decoder_result).read_text()), "_path": _rel(args.decoder_result)}
    profile = args.profile
    if profile is None:
        found = sorted(glob.glob(str(ROOT / "runs/*/bundle/profile-*.json")))
        profile = Path(found[0]) if found else None
    if profile is not None:
        return model_from_profile(Path(profile), decoder, args.sigma)
    if decoder is None:
        raise SystemExit(f"no profile and no decoder result at {args.decoder_result}")
    return model_from_results(Path(args.latency_result), decoder, args.sigma)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load_model(args)
    pol = warm_policy(model, args.new_tokens, random.Random(args.seed))
    stats0 = ReplicaStats.from_policy(
        "r", pol, text_tokens=TEXT_TOKENS, max_new_tokens=args.new_tokens, suffix_tokens=SUFFIX_TOKENS
    )
    deadlines = {k: round(args.slack * stats0.service[b].ttft_ms, 1) for k, b in CLASSES.items()}
    # capacity: the mean true service time at the budget an idle replica gives each class
    w = sum(args.mix.values())
    idle = {k: replica_budget(stats0, deadlines[k], 0.0) for k in args.mix}
    service_ms = sum(
        args.mix[k] / w * (model.ttft_ms[idle[k]] + model.decode_ms_per_token * args.new_tokens)
        for k in args.mix
    )
    routers = [r for r in args.routers.split(",") if r]
    local = {r for r in args.local.split(",") if r}
    for r in routers:
        if r not in ROUTERS:
            raise SystemExit(f"--routers: {r!r} is not one of {list(ROUTERS)}")
    rows = []
    for n in args.replicas:
        clients = min(args.max_clients, args.clients_per_replica * n)
        think = max(1.0, clients * service_ms / (args.load * n) - service_ms)
        for by, st, r in itertools.product(args.budget_by, args.staleness_ms, routers):
            for loc in (False, True) if r in local and st > 0 else (False,):
                t = time.perf_counter()
                row = simulate(
                    model,
                    stats0,
                    replicas=n,
                    clients=clients,
                    think_ms=think,
                    deadlines=deadlines,
                    mix=args.mix,
                    router=r,
                    staleness_ms=st,
                    local=loc,
                    proxies=math.ceil(n / args.replicas_per_proxy),
                    budget_by=by,
                    requests=args.requests,
                    warmup=args.warmup,
                    new_tokens=args.new_tokens,
                    follow_up=args.follow_up,
                    cache_mb=args.cache_mb,
                    seed=args.seed,
                )
                row["think_ms"] = round(think, 1)
                row["seconds"] = round(time.perf_counter() - t, 2)
                rows.append(row)
                print(
                    f"{n:3d} replicas {clients:4d} clients budget by {by:7s} staleness {st:6.0f} ms {row['router']:21s} "
                    f"hit {row['hit_rate']:.3f} budget {row['mean_budget']:6.1f} util {row['utilization']:.2f} "
                    f"({row['seconds']:.1f} s)",
                    flush=True,
                )
    return {
        **run_record(),
        "seconds": round(time.perf_counter() - t0, 1),
        "inputs": {
            "source": model.source,
            "service_ttft_ms": {str(b): round(v, 2) for b, v in model.ttft_ms.items()},
            "decode_ms_per_token": model.decode_ms_per_token,
            "hit_ttft_ms": model.hit_ttft_ms,
            "sigma": round(model.sigma, 4),
            "tail_p": round(model.tail_p, 4),
            "tail_factor": round(model.tail_factor, 4),
            "router_p95": {
                str(b): {"ttft_ms": round(s.ttft_ms, 2), "total_ms": round(s.total_ms, 2)}
                for b, s in stats0.service.items()
            },
            "router_p95_cached": {str(b): round(s.ttft_ms, 2) for b, s in stats0.cached.items()},
            "deadlines_ms": deadlines,
            "budget_by": args.budget_by,
            "replicas_per_proxy": args.replicas_per_proxy,
            "staleness_ms": args.staleness_ms,
            "routers": routers,
            "idle_budgets": idle,
            "mix": args.mix,
            "mean_service_ms_at_idle_budgets": round(service_ms, 1),
            "load": args.load,
            "clients_per_replica": args.clients_per_replica,
            "max_clients": args.max_clients,
            "new_tokens": args.new_tokens,
            "follow_up": args.follow_up,
            "cache_mb": args.cache_mb,
            "requests": args.requests,
            "warmup": args.warmup,
            "seed": args.seed,
            "text_tokens": TEXT_TOKENS,
            "suffix_tokens": SUFFIX_TOKENS,
        },
        "headline": headline(rows),
        "rows": rows,
    }


def headline(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """At the largest fleet: {budget_by: {staleness: {router: {hit_rate, mean_budget}}}}."""
    n = max(r["replicas"] for r in rows)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for r in rows:
        if r["replicas"] == n:
            at = out.setdefault(r["budget_by"], {}).setdefault(f"{r['staleness_ms']:g}", {})
            at[r["router"]] = {"hit_rate": r["hit_rate"], "mean_budget": r["mean_budget"]}
    return out


BY = {
    "replica": "the budget picked by the replica's policy when the request starts (time waited counted, as the runtime does)",
    "router": "served at the router's budget",
}


def markdown(res: dict[str, Any]) -> str:
    inp, rows = res["inputs"], res["rows"]
    src = inp["source"]
    lines = [
        "# Fleet simulation: deadline-aware routing against round robin and power of two choices",
        "",
        f"Command: `{res['command']}`; commit {res['code']['commit']} (dirty: {res['code']['dirty']}); "
        f"{res['seconds']:.0f} s on one core.",
        "",
        f"Service times from {src['latency_result'] if 'latency_result' in src else src['profile']}"
        f"{' and ' + src['decoder_result'] if 'decoder_result' in src else ''}: median TTFT per budget "
        + ", ".join(f"{b}: {v:.0f}" for b, v in inp["service_ttft_ms"].items())
        + f" ms; decode {inp['decode_ms_per_token']:.2f} ms/token x {inp['new_tokens']}; a cached prefix's "
        f"TTFT {inp['hit_ttft_ms']:.0f} ms; lognormal sigma {inp['sigma']:.3f}, {inp['tail_p']:.0%} of requests "
        f"x{inp['tail_factor']:.2f}. Router: the runtime policy's p95 ("
        + ", ".join(f"{b}: {v['ttft_ms']:.0f}" for b, v in inp["router_p95"].items())
        + " ms TTFT). Deadlines on TTFT: "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in inp["deadlines_ms"].items())
        + f" (mix {inp['mix']}); {inp['clients_per_replica']} closed-loop clients per replica (at most "
        f"{inp['max_clients']}), offered load {inp['load']:.0%} of capacity at an idle replica's budgets; "
        f"{inp['follow_up']:.0%} follow-ups about the same frame; a proxy (own router) per "
        f"{inp['replicas_per_proxy']} replicas; {inp['requests']} measured requests per run.",
        "",
        "Cells: deadline hit rate / mean budget. `+local`: the router also counts its proxy's own sends "
        "since the statistics were taken. `deadline_spread`: the deadline router, the earlier of two random "
        "replicas among the equally good instead of the earliest.",
    ]
    for by in dict.fromkeys(r["budget_by"] for r in rows):
        for st in dict.fromkeys(r["staleness_ms"] for r in rows):
            sub = [r for r in rows if r["staleness_ms"] == st and r["budget_by"] == by]
            names = list(dict.fromkeys(r["router"] for r in sub))
            lines += ["", f"**{BY[by].capitalize()}; statistics {st:g} ms old**", ""]
            lines += [
                "| replicas | clients | " + " | ".join(names) + " |",
                "|---:|---:|" + "---:|" * len(names),
            ]
            for n in dict.fromkeys(r["replicas"] for r in sub):
                cells = []
                for name in names:
                    r = next((r for r in sub if r["replicas"] == n and r["router"] == name), None)
                    cells.append(f"{r['hit_rate']:.1%} / {r['mean_budget']:.0f}" if r else "")
                clients = next(r["clients"] for r in sub if r["replicas"] == n)
                lines.append(f"| {n} | {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Hit rate and mean budget against fleet size, a column per staleness, for the first
    --budget-by (the JSON and the table have all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = res["rows"][0]["budget_by"]
    rows = [r for r in res["rows"] if r["budget_by"] == by]
    names = list(dict.fromkeys(r["router"] for r in rows))
    stale = list(dict.fromkeys(r["staleness_ms"] for r in rows))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, len(stale), figsize=(3.3 * len(stale), 6), sharey="row", squeeze=False)
    for k, st in enumerate(stale):
        for name in names:
            sub = sorted(
                (r for r in rows if r["router"] == name and r["staleness_ms"] == st),
                key=lambda r: r["replicas"],
            )
            if not sub:
                continue
            xs = [r["replicas"] for r in sub]
            style = "--" if name.endswith("+local") else "-"
            for row, what in enumerate(("hit_rate", "mean_budget")):
                axes[row][k].plot(
                    xs, [r[what] for r in sub], style, color=colors[name], marker="o", ms=3, label=name
                )
        axes[0][k].set_title(f"statistics {st:g} ms old", fontsize=9)
        for row in range(2):
            axes[row][k].set_xscale("log", base=2)
            axes[row][k].grid(alpha=0.3)
        axes[1][k].set_xlabel("replicas (15 clients each)")
    axes[0][0].set_ylabel("deadline hit rate")
    axes[1][0].set_ylabel("mean budget (visual tokens)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(f"Fleet simulation: {BY[by]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    write_json(stem.with_suffix(".json"), res)
    text = markdown(res)
    write_text(stem.with_suffix(".md"), text)
    if not args.no_plot:
        plot(res, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
