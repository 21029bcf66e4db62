"""Deadline-aware replica choice: send a request where the largest budget fits its deadline.

Each replica reports routing statistics (`ReplicaStats`): its policy's corrected p95 prediction
per budget at load level 0 (`ServiceTime`, from `runtime.policy.Policy.predict`, for the
deployment's nominal request), the per-load-level correction relative to level 0, the requests
it has in flight, optionally the predicted work they still hold (`backlog_ms`), the prefix keys
in its prefix cache and the statistics' age. For a request with a deadline the router predicts,
per replica and budget, the time from now to the request's objective (first token, or the whole
answer):

    with backlog_ms (one worker, first come first served: the requests ahead run first)
        predicted = max(0, backlog_ms - age_ms) + service[budget].time(objective)
    without (in-flight count only: the policy's own load model)
        predicted = service[budget] scaled per part by the correction at load = inflight;
                    with nothing learned that is (1 + inflight) x the service time, which is also
                    the queue behind `inflight` requests like this one
    a cached prefix (the replica holds the request's prefix key at that budget): `cached[budget]`
        instead of `service[budget]`: no vision pass and only the text after the image prefilled

`backlog_ms - age_ms`: a worker that was busy when the statistics were taken has worked off
`age_ms` of it since. Past the last load level the correction grows by processor sharing, as
the policy's does between levels ((1 + load) / (1 + level)).

`choose` takes, per replica, the largest allowed budget whose prediction fits the deadline (the
runtime policy's rule, `fit`), then the replica with the largest such budget; among those, a
replica whose prediction uses the request's cached prefix (affinity: it saves the fleet the
vision pass and the prefill, at no cost in budget or deadline), then the earliest predicted
finish; exact ties at random when given an rng. When no replica fits, each replica's smallest
budget and the earliest predicted finish among them, `met=False`. With `spread` (DeadlineSpread),
the last step is the earlier finish of two random replicas among the equally good ones, so that
routers reading the same stale statistics do not all pick the same replica. The baselines `RoundRobin` and
`PowerOfTwo` (two random replicas, the one with fewer in flight; Ray Serve's default) pick the
replica otherwise and the budget by the same `fit`, so only the replica choice differs.

Pure Python (no Ray): benchmarks/fleet_sim.py drives the same code.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from runtime.options import OBJECTIVES
from runtime.policy import MAX_LOAD, PARTS, Policy, Prediction


class ServiceTime(NamedTuple):
    """A budget's predicted p95 time on an idle replica (ms): to the first token, and decoding."""

    ttft_ms: float
    decode_ms: float

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + self.decode_ms

    def time(self, objective: str) -> float:
        """The time the deadline is on: "ttft" or "total" (runtime.options.OBJECTIVES)."""
        return self.ttft_ms if objective == "ttft" else self.total_ms

    @classmethod
    def of(cls, p: Prediction) -> ServiceTime:
        return cls(p.ttft_ms, p.stages["decode"])


def cached_prediction(policy: Policy, budget: int, suffix_tokens: int, max_new_tokens: int) -> Prediction:
    """The policy's load-0 prediction of a request whose frame prefix is cached at `budget`: no
    vision pass, only the `suffix_tokens` text tokens after the image prefilled (the prefix cache's
    hit path, runtime.prefix_cache), with the same ttft correction as a miss."""
    miss = policy.predict(budget, suffix_tokens, max_new_tokens, load=0)
    stages = {**miss.stages, "vision": 0.0}
    stages["prefill"] = policy.profile.prefill(suffix_tokens) * policy.ratio("ttft", 0)
    return Prediction(budget, stages)


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One replica's routing statistics, as of `age_ms` ago.

    service: per budget, the policy's corrected p95 prediction at load 0 for the nominal request
        the deployment reports it for (`from_policy`).
    load_ratio: per load level 0..MAX_LOAD, the correction per part ("ttft", "decode") relative to
        level 0 (level 0 is 1.0); empty: processor sharing, (1 + load).
    inflight: requests running or queued on the replica.
    backlog_ms: predicted ms of work those requests still hold (their predicted total times, less
        what has run); None when the replica reports only the count.
    prefix_keys: the keys in its prefix cache (runtime.prefix_cache.prefix_key, per frame, budget
        and prompt start); cached: per budget, the prediction when the prefix is cached.
    """

    replica: str
    service: Mapping[int, ServiceTime]
    load_ratio: Sequence[Mapping[str, float]] = ()
    inflight: int = 0
    backlog_ms: float | None = None
    prefix_keys: AbstractSet[str] = frozenset()
    cached: Mapping[int, ServiceTime] = field(default_factory=dict)
    age_ms: float = 0.0

    @classmethod
    def from_policy(
        cls,
        replica: str,
        policy: Policy,
        *,
        text_tokens: int,
        max_new_tokens: int,
        suffix_tokens: int | None = None,
        inflight: int = 0,
        backlog_ms: float | None = None,
        prefix_keys: AbstractSet[str] = frozenset(),
        age_ms: float = 0.0,
    ) -> ReplicaStats:
        """Statistics from a replica's live Policy for a nominal request (`text_tokens` of text,
        `max_new_tokens`; `suffix_tokens`: of them, after the image, for the cached predictions)."""
        service = {b: ServiceTime.of(policy.predict(b, text_tokens, max_new_tokens)) for b in policy.budgets}
        cached: dict[int, ServiceTime] = {}
        if suffix_tokens is not None:
            if not 0 <= suffix_tokens <= text_tokens:
                raise ValueError(
                    f"suffix_tokens must be in [0, text_tokens={text_tokens}], got {suffix_tokens}"
                )
            cached = {
                b: ServiceTime.of(cached_prediction(policy, b, suffix_tokens, max_new_tokens))
                for b in policy.budgets
            }
        base = policy.corrections(0)
        levels = [policy.corrections(level) for level in range(MAX_LOAD + 1)]
        load_ratio = tuple({part: c[part] / base[part] for part in PARTS} for c in levels)
        return cls(replica, service, load_ratio, inflight, backlog_ms, prefix_keys, cached, age_ms)

    def ratio(self, load: int) -> dict[str, float]:
        """The multiplier per part at `load` other requests in flight, relative to load 0."""
        load = max(load, 0)
        if not self.load_ratio:
            return {part: float(1 + load) for part in PARTS}
        level = min(load, len(self.load_ratio) - 1)
        share = (1 + load) / (1 + level)  # past the last level: processor sharing from it
        return {part: self.load_ratio[level][part] * share for part in PARTS}

    def wait_ms(self) -> float | None:
        """Predicted ms before a new request starts (None: no backlog reported)."""
        if self.backlog_ms is None:
            return None
        return max(0.0, self.backlog_ms - self.age_ms)

    def predicted_ms(self, budget: int, objective: str = "ttft", cached: bool = False) -> float:
        """Predicted ms from now to a new request's `objective` at `budget` (module docstring)."""
        s = (self.cached if cached else self.service)[budget]
        wait = self.wait_ms()
        if wait is not None:
            return wait + s.time(objective)
        r = self.ratio(self.inflight)
        ttft = s.ttft_ms * r["ttft"]
        return ttft if objective == "ttft" else ttft + s.decode_ms * r["decode"]


class Fit(NamedTuple):
    """One replica's budget for a request: the largest that fits, or its smallest (met False)."""

    budget: int
    predicted_ms: float
    met: bool
    prefix_hit: bool  # the prediction uses the replica's cached prefix at this budget


def fit(
    stats: ReplicaStats,
    deadline_ms: float,
    budgets: Sequence[int],
    objective: str = "ttft",
    prefix_keys: Mapping[int, str] | None = None,
) -> Fit | None:
    """The largest of `budgets` that this replica is predicted to finish within `deadline_ms`;
    else its smallest, met=False; None when it serves none of them. `prefix_keys`: the request's
    prefix key per budget (the key includes the budget); a held one uses `stats.cached`."""
    last: Fit | None = None
    for b in sorted(budgets, reverse=True):
        if b not in stats.service:
            continue
        key = prefix_keys.get(b) if prefix_keys else None
        hit = key is not None and b in stats.cached and key in stats.prefix_keys
        ms = stats.predicted_ms(b, objective, hit)
        if ms <= deadline_ms:
            return Fit(b, ms, True, hit)
        last = Fit(b, ms, False, hit)
    return last


class RouteChoice(NamedTuple):
    """Where a request goes, at which budget, and why."""

    replica: str
    budget: int
    predicted_ms: float  # from now to the request's objective, on that replica at that budget
    met: bool  # predicted to meet the deadline
    reason: str
    prefix_hit: bool = False


def _check(deadline_ms: float, budgets: Sequence[int], stats: Sequence[ReplicaStats], objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not stats:
        raise ValueError("no replicas to route to")
    if not budgets:
        raise ValueError("no budgets allowed")
    if not deadline_ms > 0:
        raise ValueError(f"deadline_ms must be > 0, got {deadline_ms}")


def _describe(s: ReplicaStats, f: Fit, deadline_ms: float, objective: str) -> str:
    wait = s.wait_ms()
    queue = f"{wait:.0f} ms of work ahead" if wait is not None else f"{s.inflight} in flight"
    hit = ", prefix cached" if f.prefix_hit else ""
    if f.met:
        return (
            f"{s.replica}: largest budget {f.budget} whose predicted {objective} {f.predicted_ms:.1f} ms "
            f"fits {deadline_ms:g} ms ({queue}{hit})"
        )
    return (
        f"{s.replica}: no budget fits {deadline_ms:g} ms; the smallest ({f.budget}) is predicted at "
        f"{f.predicted_ms:.1f} ms {objective} ({queue}{hit})"
    )


def choose(
    deadline_ms: float,
    budgets: Sequence[int],
    stats: Sequence[ReplicaStats],
    *,
    objective: str = "ttft",
    prefix_keys: Mapping[int, str] | None = None,
    rng: random.Random | None = None,
    spread: bool = False,
) -> RouteChoice:
    """The replica and budget for a request due in `deadline_ms` (module docstring): the largest
    budget that fits on any replica; then a replica using the request's cached prefix; then the
    earliest predicted finish; exact ties at random with `rng` (else the first). None fits: the
    earliest predicted finish at each replica's smallest budget, met=False.

    `spread` (needs `rng`): instead of the earliest finish, the earlier of two replicas drawn at
    random among those as good in met, budget and prefix. Every router that reads the same stale
    statistics picks the same earliest-finishing replica (herding); two random choices spread
    them, at no cost in budget or predicted deadline."""
    _check(deadline_ms, budgets, stats, objective)
    if spread and rng is None:
        raise ValueError("spread needs an rng")
    order = sorted(set(budgets), reverse=True)
    fits = [(s, f) for s in stats if (f := fit(s, deadline_ms, order, objective, prefix_keys)) is not None]
    if not fits:
        raise ValueError(f"no replica serves any of the budgets {order}")

    def rank(f: Fit) -> tuple[bool, int, bool, float]:  # larger is better
        return (
            (True, f.budget, f.prefix_hit, -f.predicted_ms) if f.met else (False, 0, False, -f.predicted_ms)
        )

    if spread and rng is not None:
        top = max(rank(f)[:3] for _, f in fits)
        pool = [(s, f) for s, f in fits if rank(f)[:3] == top]
        two = rng.sample(pool, 2) if len(pool) > 1 else pool
        s, f = min(two, key=lambda x: x[1].predicted_ms)
    else:
        best = max(rank(f) for _, f in fits)
        ties = [(s, f) for s, f in fits if rank(f) == best]
        s, f = rng.choice(ties) if rng is not None and len(ties) > 1 else ties[0]
    met = sum(g.met for _, g in fits)
    why = _describe(s, f, deadline_ms, objective)
    if not f.met:
        why = f"no replica meets {deadline_ms:g} ms; earliest predicted finish: {why}"
        return RouteChoice(s.replica, f.budget, f.predicted_ms, False, why, f.prefix_hit)
    why += f"; {met} of {len(fits)} replicas meet the deadline"
    if f.prefix_hit:
        faster = [
            (t, g) for t, g in fits if g.met and g.budget == f.budget and g.predicted_ms < f.predicted_ms
        ]
        if faster:
            t, g = min(faster, key=lambda x: x[1].predicted_ms)
            why += f"; prefix affinity over {t.replica} ({g.predicted_ms:.1f} ms, not cached)"
    return RouteChoice(s.replica, f.budget, f.predicted_ms, True, why, f.prefix_hit)


def _on(
    s: ReplicaStats,
    deadline_ms: float,
    budgets: Sequence[int],
    objective: str,
    prefix_keys: Mapping[int, str] | None,
    how: str,
) -> RouteChoice:
    """A baseline's answer: replica `s` (picked by `how`) at the budget `fit` gives it."""
    f = fit(s, deadline_ms, budgets, objective, prefix_keys)
    if f is None:
        raise ValueError(f"replica {s.replica} serves none of the budgets {sorted(budgets, reverse=True)}")
    return RouteChoice(
        s.replica,
        f.budget,
        f.predicted_ms,
        f.met,
        f"{how}; {_describe(s, f, deadline_ms, objective)}",
        f.prefix_hit,
    )


class Router(Protocol):
    """What the fleet simulation and a serving front end call: one replica and budget per request."""

    name: str

    def choose(
        self,
        deadline_ms: float,
        budgets: Sequence[int],
        stats: Sequence[ReplicaStats],
        *,
        objective: str = "ttft",
        prefix_keys: Mapping[int, str] | None = None,
    ) -> RouteChoice: ...


class DeadlineAware:
    """`choose` with a seeded rng for exact ties (idle replicas look alike: spread them)."""

    name = "deadline"
    spread = False

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choose(
        self,
        deadline_ms: float,
        budgets: Sequence[int],
        stats: Sequence[ReplicaStats],
        *,
        objective: str = "ttft",
        prefix_keys: Mapping[int, str] | None = None,
    ) -> RouteChoice:
        return choose(
            deadline_ms,
            budgets,
            stats,
            objective=objective,
            prefix_keys=prefix_keys,
            rng=self.rng,
            spread=self.spread,
        )


class DeadlineSpread(DeadlineAware):
    """`choose` with spread=True: the largest budget and the prefix as `DeadlineAware`, then the
    earlier finish of two random replicas among the equally good (robust to stale statistics)."""

    name = "deadline_spread"
    spread = True


class RoundRobin:
    """The next replica in list order, whatever its load; the budget by `fit`."""

    name = "round_robin"

    def __init__(self, seed: int = 0) -> None:  # (seed: the routers' common signature; unused)
        self.next = 0

    def choose(
        self,
        deadline_ms: float,
        budgets: Sequence[int],
        stats: Sequence[ReplicaStats],
        *,
        objective: str = "ttft",
        prefix_keys: Mapping[int, str] | None = None,
    ) -> RouteChoice:
        _check(deadline_ms, budgets, stats, objective)
        i = self.next % len(stats)
        self.next = i + 1
        return _on(stats[i], deadline_ms, budgets, objective, prefix_keys, f"round robin: replica #{i}")


class PowerOfTwo:
    """Two replicas drawn at random (seeded), the one with fewer requests in flight (the first
    drawn on a tie); Ray Serve's default. The budget by `fit`."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choose(
        self,
        deadline_ms: float,
        budgets: Sequence[int],
        stats: Sequence[ReplicaStats],
        *,
        objective: str = "ttft",
        prefix_keys: Mapping[int, str] | None = None,
    ) -> RouteChoice:
        _check(deadline_ms, budgets, stats, objective)
        if len(stats) == 1:
            return _on(
                stats[0], deadline_ms, budgets, objective, prefix_keys, "power of two: the only replica"
            )
        a, b = (stats[i] for i in self.rng.sample(range(len(stats)), 2))
        s = b if b.inflight < a.inflight else a
        how = f"power of two: {s.replica} of {a.replica} ({a.inflight} in flight), {b.replica} ({b.inflight})"
        return _on(s, deadline_ms, budgets, objective, prefix_keys, how)


ROUTERS: dict[str, type[DeadlineAware] | type[RoundRobin] | type[PowerOfTwo]] = {
    r.name: r for r in (DeadlineAware, DeadlineSpread, RoundRobin, PowerOfTwo)
}
