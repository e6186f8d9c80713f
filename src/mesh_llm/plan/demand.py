"""The demand map and what a node does about it (pure: the caller passes records and the time).

Every node counts the requests its own proxy sees per model (`DemandCounter`) and gossips
them; the mesh's demand for a model is the *sum* over live nodes, with the latest activity
(`merge_demand`). From that and every node's record, `decide` tells this node whether to
pick up a model that is wanted but served by nobody, to add a server for a hot model, or to
unload a model it promoted itself for that nobody asked for in a while.

Exactly one node acts: the nodes that could (they have the file, enough free memory, and do
not serve the model yet) are ranked the same way on every node (most free memory, then
id); the first acts after a short debounce, the next only if the model is still not served
NEXT_STANDBY_SECS later, and so on.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mesh_llm.api.routing import match_model
from mesh_llm.mesh.peers import MAX_DEMAND, MAX_NAME_LEN, DemandEntry, OnDemand, PeerRecord
from mesh_llm.text import is_name

WINDOW_SECS = 60.0  # requests are counted over the last minute
DEMAND_TTL_SECS = 3600.0  # a model nobody asked for in this long is dropped from the map
PICKUP_DEBOUNCE_SECS = 2.0  # unserved this long (not just for a moment during a re-plan) before a standby acts
NEXT_STANDBY_SECS = 8.0  # the next-ranked node acts when the one before has not started serving by then
HOT_REQUESTS_PER_MIN = 10
HOT_RATIO = 3.0  # ... and this many times the requests per server of the busiest other model
HOT_HOLD_SECS = 5.0  # hot for this long before a server is added
HOT_SETTLE_SECS = 30.0  # after a model's servers changed, this long before another is added for heat
RETRY_SECS = 60.0  # a promotion that failed is not tried again by this node for this long
DEFAULT_IDLE_UNLOAD_SECS = 600.0
SERVING_STATES = ("ready", "loading", "planning")  # a hosted model in these serves (or is about to)


@dataclass(frozen=True)
class ModelDemand:
    requests: int  # in the last window, summed over the mesh's nodes
    last_active: float  # unix time of the latest request any node saw


class DemandCounter:
    """Requests this node's proxy saw per model, in one-second buckets over WINDOW_SECS.

    At most `max_models` models are kept: past that, names that match no model the mesh knows
    go first, then the least recently asked for (a caller inventing names cannot push out
    real demand)."""

    def __init__(self, window: float = WINDOW_SECS, max_models: int = MAX_DEMAND, ttl: float = DEMAND_TTL_SECS) -> None:
        self.window, self.max_models, self.ttl = window, max_models, ttl
        self._buckets: dict[str, collections.deque[list[int]]] = {}  # model -> [[second, count], ...]
        self._last: dict[str, float] = {}
        self._known: dict[str, bool] = {}

    def count(self, model: str, now: float, known: bool = True) -> bool:
        """One request for `model` at unix time `now`; True when it had none in the window
        before (news worth telling the mesh at once)."""
        if not is_name(model, MAX_NAME_LEN):
            return False
        self._expire(now)
        fresh = not self._requests(model, now)
        buckets = self._buckets.setdefault(model, collections.deque())
        second = int(now)
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
        self._last[model] = max(now, self._last.get(model, 0.0))
        self._known[model] = known or self._known.get(model, False)
        while len(self._last) > self.max_models:
            victim = min(self._last, key=lambda m: (self._known[m], self._last[m]))
            self._forget(victim)
        return fresh

    def _requests(self, model: str, now: float) -> int:
        buckets = self._buckets.get(model)
        if not buckets:
            return 0
        while buckets and buckets[0][0] <= now - self.window:
            buckets.popleft()
        return sum(c for _, c in buckets)

    def _expire(self, now: float) -> None:
        for model in [m for m, at in self._last.items() if now - at > self.ttl]:
            self._forget(model)

    def _forget(self, model: str) -> None:
        self._buckets.pop(model, None)
        self._last.pop(model, None)
        self._known.pop(model, None)

    def entries(self, now: float) -> tuple[DemandEntry, ...]:
        """What this node gossips: its own counts, most recently active first."""
        self._expire(now)
        ordered = sorted(self._last, key=lambda m: -self._last[m])
        return tuple(DemandEntry(m, self._requests(m, now), round(self._last[m], 1)) for m in ordered)


def merge_demand(records: Iterable[PeerRecord], now: float, ttl: float = DEMAND_TTL_SECS) -> dict[str, ModelDemand]:
    """The mesh's demand: each live node's own counts summed, the latest activity kept. A time
    in the future (a skewed or lying clock) counts as now; entries older than `ttl` are dropped."""
    requests: dict[str, int] = {}
    last: dict[str, float] = {}
    for r in records:
        for e in r.demand:
            at = min(e.last_active, now)
            if now - at > ttl:
                continue
            requests[e.model] = requests.get(e.model, 0) + e.requests
            last[e.model] = max(last.get(e.model, 0.0), at)
    return {m: ModelDemand(requests[m], last[m]) for m in sorted(requests)}


def known_names(records: Iterable[PeerRecord]) -> dict[str, tuple[str, ...]]:
    """Every model the mesh knows by name, with its aliases: hosted, given with --model, on demand."""
    names: dict[str, tuple[str, ...]] = {}

    def add(name: str, aliases: Sequence[str] = ()) -> None:
        names[name] = tuple(dict.fromkeys((*names.get(name, ()), *aliases)))

    for r in records:
        if r.role == "client":
            continue
        for h in r.hosting:
            add(h.name, h.aliases)
        for m in r.models_on_disk:
            add(m)
        for o in r.on_demand:
            add(o.name, o.aliases)
    return names


def resolve(requested: str, records: Iterable[PeerRecord]) -> str | None:
    """The model a request's name means, among those the mesh knows (None: none, or several)."""
    return match_model(requested, known_names(records)).model


def servers_of(model: str, records: Iterable[PeerRecord]) -> frozenset[str]:
    """Nodes that serve `model` or are about to (loading, planning)."""
    return frozenset(r.id for r in records if r.role != "client" and any(h.name == model and h.state in SERVING_STATES for h in r.hosting))


def pinned_by(model: str, records: Iterable[PeerRecord], besides: str = "") -> list[str]:
    """Nodes (other than `besides`) that were asked to serve `model` (--model, or a load)."""
    return [r.hostname or r.id[:8] for r in records if r.role != "client" and r.id != besides and model in r.models_on_disk]


def _offer(r: PeerRecord, model: str) -> OnDemand | None:
    return next((o for o in r.on_demand if o.name == model or model in o.aliases), None)


def candidates(model: str, records: Sequence[PeerRecord]) -> list[PeerRecord]:
    """The nodes that could start serving `model` now, in the order every node ranks them: they
    have its file on demand (the fingerprint the mesh knows for it, when it knows one), enough
    free memory, and do not host it in any state; most free memory first, then lowest id."""
    known_fps = {fp for r in records if r.role != "client" for m, fp in zip(r.models_on_disk, r.fingerprints, strict=False) if m == model and fp}
    out = []
    for r in records:
        offer = _offer(r, model)
        if r.role == "client" or offer is None or any(h.name == model for h in r.hosting) or model in r.models_on_disk:
            continue
        if known_fps and offer.fingerprint and offer.fingerprint not in known_fps:
            continue
        if r.free_bytes >= offer.need_bytes:
            out.append(r)
    return sorted(out, key=lambda r: (-r.free_bytes, r.id))


def coming(requested: str, records: Sequence[PeerRecord]) -> str | None:
    """The model a request names when it is about to be served: a node is loading it, or some
    node could pick it up (so the request should wait rather than get a 404). None: neither."""
    model = resolve(requested, records)
    if model is None:
        return None
    loading = any(r.role != "client" and any(h.name == model and h.state in ("loading", "planning") for h in r.hosting) for r in records)
    return model if loading or candidates(model, records) else None


@dataclass(frozen=True)
class Promote:
    model: str
    reason: str
    hot: bool = False  # another server for a hot model (else: a model nobody serves)


@dataclass(frozen=True)
class Demote:
    model: str
    reason: str


Decision = Promote | Demote


@dataclass
class DemandMemory:
    """What `decide` remembers between rounds on one node (its hysteresis)."""

    unserved_since: dict[str, float] = field(default_factory=dict)
    hot_since: dict[str, float] = field(default_factory=dict)
    servers_seen: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)  # model -> (servers, since)
    failed_at: dict[str, float] = field(default_factory=dict)  # models whose promotion here failed, and when


def _ago(secs: float) -> str:
    return f"{secs:.0f} s ago" if secs < 120 else f"{secs / 60:.0f} min ago"


def _my_turn(me: str, model: str, records: Sequence[PeerRecord], promoted: Mapping[str, float], memory: DemandMemory,
             held: float, hold: float) -> bool:
    """Whether this node should act on `model` now, a condition having held for `held` seconds:
    it is a candidate, has not taken it (or failed to) already, and its rank's wait is over."""
    ranked = [r.id for r in candidates(model, records)]
    if me not in ranked or model in promoted or model in memory.failed_at:
        return False
    return held >= hold + ranked.index(me) * NEXT_STANDBY_SECS


def decide(me: str, records: Sequence[PeerRecord], now: float, memory: DemandMemory, promoted: Mapping[str, float],
           idle_unload: float = DEFAULT_IDLE_UNLOAD_SECS) -> list[Decision]:
    """What this node (`me`, whose own record is among `records`) should do now.

    `promoted`: the models it promoted itself for, and since when (unix time). A model is
    wanted when a live node was asked to serve it, or a request named it within `idle_unload`
    (so a model picked up for a request is not unloaded as idle at once, and one unloaded as
    idle is not picked up again without a new request)."""
    mine = next((r for r in records if r.id == me), None)
    if mine is None or mine.role == "client":
        return []
    demand = merge_demand(records, now)
    # only models some node knows (hosts, was given, has on demand): a name nobody has cannot be
    # served, and callers (or a peer) inventing names must not make every round slower
    known = known_names(records)
    names = {m for m in demand if m in known} | {m for r in records if r.role != "client" for m in r.models_on_disk}
    servers = {m: servers_of(m, records) for m in names | set(promoted)}
    memory.failed_at = {m: at for m, at in memory.failed_at.items() if now - at < RETRY_SECS}
    out: list[Decision] = []

    # a model wanted and served by nobody: the first-ranked node with its file picks it up
    for model in sorted(names):
        d = demand.get(model)
        recent = d is not None and now - d.last_active <= idle_unload
        pins = pinned_by(model, records)
        if servers[model] or not (recent or pins):
            memory.unserved_since.pop(model, None)
            continue
        since = memory.unserved_since.setdefault(model, now)
        if _my_turn(me, model, records, promoted, memory, now - since, PICKUP_DEBOUNCE_SECS):
            if d is not None and d.requests:
                why = f"requested {d.requests}× in the last minute"
            elif d is not None:
                why = f"last requested {_ago(now - d.last_active)}"
            else:
                why = f"named by {', '.join(pins[:3])}"
            out.append(Promote(model, f"{why}, served by nobody"))
    for model in [m for m in memory.unserved_since if m not in names]:
        del memory.unserved_since[model]

    # a hot model: many requests, and far more per server than any other model gets
    per_server = {m: demand[m].requests / len(servers[m]) for m in demand if servers.get(m)}
    for model, load in sorted(per_server.items()):
        seen = memory.servers_seen.get(model)
        if seen is None:
            memory.servers_seen[model] = (servers[model], 0.0)  # as first seen: settled long ago
        elif seen[0] != servers[model]:
            memory.servers_seen[model] = (servers[model], now)
        others = max((v for m, v in per_server.items() if m != model), default=0.0)
        if demand[model].requests < HOT_REQUESTS_PER_MIN or load < HOT_RATIO * others:
            memory.hot_since.pop(model, None)
            continue
        hot_since = memory.hot_since.setdefault(model, now)
        settled = now >= memory.servers_seen[model][1] + HOT_SETTLE_SECS
        if settled and _my_turn(me, model, records, promoted, memory, now - hot_since, HOT_HOLD_SECS):
            n = len(servers[model])
            versus = f", {HOT_RATIO:g}× the busiest other model's {others:.0f}" if others else ""
            out.append(Promote(model, f"hot: {demand[model].requests} requests in the last minute on {n} server{'s' if n > 1 else ''}{versus}", hot=True))
    for model in [m for m in memory.hot_since if m not in per_server]:
        del memory.hot_since[model]
    for model in [m for m in memory.servers_seen if m not in per_server]:
        del memory.servers_seen[model]

    # a model this node promoted itself for and nobody asked for in `idle_unload`
    for model, since in sorted(promoted.items()):
        d = demand.get(model)
        idle = now - max(since, d.last_active if d else 0.0)
        if idle < idle_unload:
            continue
        elsewhere = servers.get(model, frozenset()) - {me}
        pins = pinned_by(model, records, besides=me)
        if not elsewhere and pins:  # it would be unserved while a node still asks for it
            continue
        out.append(Demote(model, f"idle {idle:.0f} s" + (f"; {len(elsewhere)} other server(s) keep it" if elsewhere else "")))
    return out
