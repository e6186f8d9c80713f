"""The demand shell: counts this node's requests, gossips them, and carries out what
`plan/demand.py` decides (pick a model up through the fleet, unload it again when idle).

It evaluates once a second and at once on mesh events; every decision is said in one line
and kept (the last MAX_DECISIONS) for /api/status and the console.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import OnDemand, PeerRecord
from mesh_llm.plan.demand import (
    DEFAULT_IDLE_UNLOAD_SECS,
    NEXT_STANDBY_SECS,
    DemandCounter,
    DemandMemory,
    Demote,
    Promote,
    coming,
    decide,
    merge_demand,
    resolve,
    servers_of,
)
from mesh_llm.serving.fleet import Fleet, RuntimeRefusal
from mesh_llm.serving.lifecycle import Phase
from mesh_llm.serving.runner import ModelSpec

TICK_SECS = 1.0
PUBLISH_SECS = 5.0  # counts go into gossip at most this often (a model's first request at once)
URGENT_PUBLISH_SECS = 0.5  # requests for a model nobody serves are told at most this often
MAX_DECISIONS = 20


def on_demand_entry(spec: ModelSpec) -> OnDemand:
    return OnDemand(spec.model_id, spec.fingerprint, spec.need + (spec.draft.need if spec.draft else 0), spec.aliases)


class DemandKeeper:
    def __init__(self, mesh: Mesh, fleet: Fleet | None, on_demand: list[ModelSpec], *, idle_unload: float = DEFAULT_IDLE_UNLOAD_SECS,
                 say: Callable[[str], None], warn: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self.mesh, self.fleet, self.idle_unload, self.say, self.warn, self.clock = mesh, fleet, idle_unload, say, warn, clock
        self.specs = {s.model_id: s for s in on_demand}
        self.counter = DemandCounter()
        self.memory = DemandMemory()
        self.promoted: dict[str, float] = {}  # models this node picked up itself, since when (unix time)
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_DECISIONS)
        self.on_change: Callable[[], None] = lambda: None
        self._published_at = 0.0
        self._urgent = False  # requests for a model nobody serves wait to be told (at most every URGENT_PUBLISH_SECS)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy: set[str] = set()  # demotions under way
        self._unloads: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references to tasks

    # -- the proxy's hooks -----------------------------------------------------------

    def records(self) -> list[PeerRecord]:
        return [self.mesh.me] + [m.record for m in self.mesh.members()]

    def on_request(self, requested: str) -> None:
        records, now = self.records(), self.clock()
        model = resolve(requested, records)
        fresh = self.counter.count(model or requested, now, known=model is not None)
        # a model's first request in a while, or one for a model nobody serves: tell the mesh now
        # (a standby may be waiting for just that), not at the next periodic publish
        if fresh:
            self.publish()
        elif model is not None and not servers_of(model, records):
            self._urgent = True
            self._wake.set()

    def coming(self, requested: str) -> str | None:
        return coming(requested, self.records())  # asked ten times a second while a request waits: no side effects

    # -- the loop --------------------------------------------------------------------

    def start(self) -> None:
        self.mesh.update_self(on_demand=tuple(on_demand_entry(s) for s in self.specs.values()))
        self._task = asyncio.ensure_future(self._loop())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._unloads) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def publish(self) -> None:
        self._published_at, self._urgent = self.clock(), False
        self.mesh.update_self(demand=self.counter.entries(self._published_at))
        self._wake.set()

    async def _loop(self) -> None:
        events = self.mesh.subscribe()
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({getter, woken}, timeout=TICK_SECS, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                    woken.cancel()
                while not events.empty():
                    events.get_nowait()
                self._wake.clear()
                try:
                    self.round()
                except Exception as exc:  # a bug in one round must not end demand handling for good
                    self.warn(f"Demand: round failed: {exc.__class__.__name__}: {exc}")
        finally:
            self.mesh.unsubscribe(events)

    def round(self) -> None:
        now = self.clock()
        due = now - self._published_at >= (URGENT_PUBLISH_SECS if self._urgent else PUBLISH_SECS)
        if due and self.mesh.me.demand != (entries := self.counter.entries(now)):
            self._published_at, self._urgent = now, False
            self.mesh.update_self(demand=entries)
        if self.fleet is None:
            return
        self._watch_promoted(now)
        for decision in decide(self.mesh.me.id, self.records(), now, self.memory, self.promoted, self.idle_unload):
            if decision.model in self._busy:
                continue
            if isinstance(decision, Promote):
                self._promote(decision, now)
            else:
                self._unload(decision)

    def _watch_promoted(self, now: float) -> None:
        """A promoted model that was unloaded by hand is no longer ours to unload; one that
        failed or does not fit after all is given back so the next node may try."""
        assert self.fleet is not None
        for model, since in list(self.promoted.items()):
            loaded = self.fleet.loaded.get(model)
            if loaded is None:
                if model not in self._busy:
                    del self.promoted[model]
                continue
            stuck = loaded.life.phase in (Phase.FAILED, Phase.WAITING) and now - since > NEXT_STANDBY_SECS
            if stuck and model not in self._busy:
                self.memory.failed_at[model] = now
                self._unload(Demote(model, f"it did not start here: {loaded.life.detail or loaded.life.phase.value}"))

    def _promote(self, decision: Promote, now: float) -> None:
        assert self.fleet is not None
        spec = self.specs.get(decision.model) or next((s for s in self.specs.values() if decision.model in s.aliases), None)
        if spec is None or spec.model_id in self.fleet.loaded:
            return
        try:
            refusal = self.fleet.refusal_to_load(spec)
            if refusal is not None:
                raise refusal
            self.fleet.add(spec)
        except RuntimeRefusal as exc:
            self.memory.failed_at[decision.model] = now
            self._record("cannot pick up", decision.model, str(exc), now)
            return
        self.promoted[spec.model_id] = now
        self._record("adding a server for" if decision.hot else "picking up", spec.model_id, decision.reason, now)

    def _unload(self, decision: Demote) -> None:
        self._busy.add(decision.model)
        task = asyncio.ensure_future(self._demote(decision))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _demote(self, decision: Demote) -> None:
        assert self.fleet is not None
        self._record("unloading", decision.model, decision.reason, self.clock())
        try:
            await self.fleet.unload(decision.model)
        except RuntimeRefusal:
            pass  # already gone
        finally:
            self.promoted.pop(decision.model, None)
            self._busy.discard(decision.model)
            self._wake.set()

    def _record(self, action: str, model: str, reason: str, now: float) -> None:
        self.say(f"Demand: {action} {model} ({reason})")
        self.decisions.appendleft({"at": round(now, 1), "action": action, "model": model, "reason": reason})
        self.on_change()

    # -- what /api/status shows ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        records = self.records()
        demand = merge_demand(records, now)
        return {
            "window_secs": self.counter.window,
            "idle_unload_secs": self.idle_unload,
            "models": [{"model": m, "requests_per_min": d.requests, "last_active": d.last_active,
                        "servers": len(servers_of(m, records))}
                       for m, d in demand.items()],
            "on_demand": sorted(self.specs),
            "promoted": sorted(self.promoted),
            "decisions": list(self.decisions),
        }
