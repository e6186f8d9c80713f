"""The one owner of the models this node runs.

It is the node's single mesh subscriber. On every change (a peer joins or leaves,
a record changes, a model is loaded or unloaded, a process comes or goes) it
places all its models within the one memory budget (`plan/placement.py`), feeds
each model's lifecycle the plan (`lifecycle.py`) and hands the resulting actions
to that model's runner, one at a time in order. Then it publishes: what this
node hosts, lends and has free goes into gossip, and the proxy's table is
rewritten (`routes.py`). The RPC workers this node lends are started and stopped
to match the splits other nodes host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_llm.api.proxy import Gate, Server, UpstreamTable
from mesh_llm.engine.llama_server import fallback_chat_template
from mesh_llm.engine.supervisor import ManagedProcess, Supervisor
from mesh_llm.errors import UserError
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import MAX_DETAIL, MAX_HOSTED, HostedModel, MeshEvent, PeerRecord, Slice, experts_mask, wire_order
from mesh_llm.models.moe_shard import expert_bytes, unshardable
from mesh_llm.plan.budget import ledger
from mesh_llm.plan.experts import ExpertFacts, core_size
from mesh_llm.plan.placement import Placement, Unplannable, Wanted, peer_candidates, place
from mesh_llm.plan.split import HEADROOM, Plan, Shards, Solo, Split, Standby, Waiting, format_tensor_split
from mesh_llm.serving.lifecycle import (
    ADVERTISED,
    ROUTED,
    Action,
    Drain,
    Drained,
    Event,
    Launch,
    Life,
    Phase,
    Planned,
    RetryDue,
    RetryIn,
    ServerDown,
    ServerRestarting,
    Stop,
    Stopped,
    UnloadAsked,
    plan_key,
    restart_cause,
    step,
)
from mesh_llm.serving.proofs import FileProofs
from mesh_llm.serving.routes import LocalRoute, MeshRoutes
from mesh_llm.serving.runner import EngineSettings, ModelRunner, ModelSpec, split_doc
from mesh_llm.serving.workers import RpcWorkers

DEBOUNCE_SECS = 0.3  # a join brings several events: plan once
LEND_WAIT_SECS = 30.0  # a worker that has not started its RPC worker by then is planned without
UNWILLING_SECS = 60.0  # ... for this long
UNLOAD_GRACE_SECS = 30.0  # requests in flight when a model is unloaded get this long to finish
SETTLED = (Phase.READY, Phase.WAITING, Phase.STANDBY, Phase.FAILED, Phase.GONE)  # a first outcome to report


class RuntimeRefusal(UserError):
    """A runtime request the node turns down, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SplitOptions:
    force_split: bool = False
    tensor_split: tuple[float, ...] | None = None


@dataclass
class Loaded:
    """A model in the fleet: what it is, where its life stands, who carries out its actions."""

    spec: ModelSpec
    runner: ModelRunner
    split: SplitOptions
    life: Life = field(default_factory=Life)
    actions: asyncio.Queue[Action] = field(default_factory=asyncio.Queue)
    settled: asyncio.Future[Life] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    awaiting_workers_since: float | None = None
    here_bytes: int = 0
    task: asyncio.Task[None] | None = None
    retry: asyncio.TimerHandle | None = None
    launched: Plan | None = None  # the plan its server last ran under (restarts are counted against it)

    @property
    def name(self) -> str:
        return self.spec.model_id


class Fleet:
    def __init__(self, mesh: Mesh, supervisor: Supervisor, table: UpstreamTable, *, offer: int, engine_version: str,
                 settings: EngineSettings | None, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.mesh, self.supervisor, self.offer, self.engine_version, self.settings = mesh, supervisor, offer, engine_version, settings
        self.say, self.warn = say, warn
        self.routes = MeshRoutes(mesh, table, self._route_refusal)
        self.proofs = FileProofs(mesh, warn, self._proof_done)
        self.workers = RpcWorkers(supervisor, settings.engine, settings.device, settings.log_dir, warn, self.kick) if settings else None
        self.loaded: dict[str, Loaded] = {}  # in the order they were loaded: earlier models keep their memory
        self.placement = Placement({}, {}, offer)
        self.on_change: Callable[[], None] = lambda: None  # the console's status feed listens here
        self.on_restart: Callable[[str, str], None] = lambda model, cause: None  # a server started again, and why (metrics)
        self.announced = False  # the start-up banner is out: later models announce themselves
        self._unwilling: dict[tuple[str, str], float] = {}  # (model, worker) -> since when it failed to lend
        self._kick = asyncio.Event()
        self._replanning = asyncio.Lock()  # one plan at a time (the loop, a load, an unload)
        self._routes_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_said: dict[str, str] = {}

    # -- lifecycle of the fleet itself --------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._plan_loop()), asyncio.ensure_future(self._routes_loop())]
        self._routes_dirty.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for loaded in list(self.loaded.values()):
            await self._retire(loaded)
        if self.workers is not None:
            await self.workers.close()
        await self.proofs.close()
        await self.routes.close()

    def kick(self) -> None:
        """Something local changed (a worker came up, a model was added): plan again soon."""
        self._kick.set()

    async def _plan_loop(self) -> None:
        events = self.mesh.subscribe()
        try:
            await self._guarded(self.replan)
            while True:
                getter = asyncio.ensure_future(events.get())
                kicked = asyncio.ensure_future(self._kick.wait())
                try:
                    done, _ = await asyncio.wait({getter, kicked}, return_when=asyncio.FIRST_COMPLETED, timeout=2.0)
                finally:
                    getter.cancel()
                    kicked.cancel()
                if getter in done:
                    await self._settle(events)
                while not events.empty():
                    events.get_nowait()
                self._kick.clear()
                await self._guarded(self.replan)
        finally:
            self.mesh.unsubscribe(events)

    async def _settle(self, events: asyncio.Queue[MeshEvent]) -> None:
        """Routes follow every mesh event at once; planning waits until a burst is over."""
        self._routes_dirty.set()
        deadline = asyncio.get_running_loop().time() + DEBOUNCE_SECS
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.wait_for(events.get(), left)
            except TimeoutError:
                return
            self._routes_dirty.set()

    async def _routes_loop(self) -> None:
        while True:
            await self._routes_dirty.wait()
            self._routes_dirty.clear()
            await self._guarded(self.sync_routes)

    async def sync_routes(self) -> None:
        self._ask_proofs()
        await self.routes.sync(self._local_routes())
        self.on_change()

    async def _guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """A bug in one round must not stop planning or routing for good: say it, go on."""
        try:
            await work()
        except Exception as exc:
            self.warn(f"{work.__name__} failed: {exc.__class__.__name__}: {exc}")

    # -- models in and out ----------------------------------------------------------

    def add(self, spec: ModelSpec, split: SplitOptions = SplitOptions()) -> Loaded:
        """Take a prepared model into the fleet; it is placed on the next plan (at once)."""
        if self.settings is None or self.workers is None:
            raise RuntimeRefusal(400, "this node is a client: it runs no models (start a node without --client to serve one)")
        if spec.model_id in self.loaded:
            raise RuntimeRefusal(409, f"{spec.model_id} is already loaded on this node")
        if len(self.loaded) >= MAX_HOSTED:
            raise RuntimeRefusal(422, f"this node already serves {MAX_HOSTED} models, the most one node may: unload one first")
        name = spec.model_id
        runner = ModelRunner(spec, self.settings, self.mesh, self.supervisor, self.workers, lambda ev: self.feed(name, ev))
        loaded = Loaded(spec, runner, split)
        loaded.task = asyncio.ensure_future(self._act(loaded))
        self.loaded[name] = loaded
        self.publish()
        self.kick()
        return loaded

    def trial(self, spec: ModelSpec, split: SplitOptions = SplitOptions()) -> Plan | Unplannable:
        """How `spec` would be planned if it were loaded now, after every model already here."""
        placement = self._place(extra=wanted(spec, split))
        return placement.plans[spec.model_id]

    def refusal_to_load(self, spec: ModelSpec) -> RuntimeRefusal | None:
        """Why a runtime load of `spec` is refused now (None: it can start; `add` refuses a second copy)."""
        if spec.model_id in self.loaded:
            return None
        plan = self.trial(spec)
        if isinstance(plan, Waiting):
            room = self.placement.free
            return RuntimeRefusal(422, f"{spec.model_id} does not fit: it needs {spec.need / 1e9:.2f} GB, this node has {room / 1e9:.2f} GB "
                                       f"free of {self.offer / 1e9:.2f} GB, and the mesh cannot split it now ({plan.message().lower()})")
        if isinstance(plan, Unplannable):
            return RuntimeRefusal(422, f"{spec.model_id} cannot be planned: {plan.reason}")
        return None

    async def unload(self, name: str) -> None:
        """Withdraw the model's route, let requests in flight finish (bounded), stop its server."""
        loaded = self.loaded.get(name)
        if loaded is None:
            raise RuntimeRefusal(404, f"{name} is not loaded on this node; loaded: {', '.join(self.loaded) or 'none'}")
        self.feed(name, UnloadAsked())
        await loaded.gone.wait()
        await asyncio.shield(self.replan())  # its memory is free again, in the budget and in gossip (even if the caller left)

    # -- the lifecycle loop -----------------------------------------------------------

    def feed(self, name: str, event: Event) -> None:
        """Step the model's lifecycle; queue its actions; publish what changed."""
        loaded = self.loaded.get(name)
        if loaded is None:
            return
        before = loaded.life
        loaded.life, actions = step(loaded.life, event)
        for action in actions:
            loaded.actions.put_nowait(action)
            if isinstance(action, Launch):
                if loaded.launched is not None:
                    self.on_restart(name, restart_cause(loaded.launched, action.plan))
                loaded.launched = action.plan
        if isinstance(event, ServerRestarting) and event.key == before.running:
            self.on_restart(name, "crashed")
        if loaded.life.phase is Phase.STARTING and loaded.life.running is None:
            loaded.awaiting_workers_since = loaded.awaiting_workers_since or time.monotonic()
        else:
            loaded.awaiting_workers_since = None
        if loaded.life != before:
            self._tell(loaded, before)
            self.publish()
        if loaded.life.phase in SETTLED and not loaded.settled.done():
            loaded.settled.set_result(loaded.life)

    async def _act(self, loaded: Loaded) -> None:
        """Carry out one model's actions in order (a stop finishes before the next launch).
        Whatever goes wrong comes back as a lifecycle event, so no model waits forever."""
        while loaded.life.phase is not Phase.GONE:
            action = await loaded.actions.get()
            try:
                if isinstance(action, Launch):
                    await loaded.runner.launch(action.plan)
                elif isinstance(action, Stop):
                    await loaded.runner.stop()
                elif isinstance(action, Drain):
                    drained = await loaded.runner.gate.idle(UNLOAD_GRACE_SECS)
                    if not drained:
                        self.warn(f"{loaded.name}: {loaded.runner.gate.in_flight} request(s) still running after {UNLOAD_GRACE_SECS:.0f} s; stopping anyway")
                    self.feed(loaded.name, Drained())
                elif isinstance(action, RetryIn):
                    loaded.retry = asyncio.get_running_loop().call_later(action.secs, self._feed_if_current, loaded, RetryDue())
            except Exception as exc:  # one model's failure must not stop its queue (or the node)
                self.warn(f"{loaded.name}: {action.__class__.__name__.lower()} failed: {exc.__class__.__name__}: {exc}")
                if isinstance(action, Launch):
                    self.feed(loaded.name, ServerDown(plan_key(action.plan), f"llama-server could not be started: {exc}"))
            if isinstance(action, Stop) and loaded.life.phase is Phase.UNLOADING and loaded.life.drained:
                self.feed(loaded.name, Stopped())  # its memory is free only now
        self._forget(loaded)

    def _feed_if_current(self, loaded: Loaded, event: Event) -> None:
        """A timer's event for a model that may have been unloaded (and loaded again) since."""
        if self.loaded.get(loaded.name) is loaded:
            self.feed(loaded.name, event)

    def _forget(self, loaded: Loaded) -> None:
        if loaded.retry is not None:
            loaded.retry.cancel()
        self.loaded.pop(loaded.name, None)
        loaded.gone.set()
        self.say(f"Unloaded {loaded.name}")
        self.publish()
        self.kick()

    async def _retire(self, loaded: Loaded) -> None:
        if loaded.task is not None:
            loaded.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loaded.task
        await loaded.runner.stop()

    def on_process_change(self, mp: ManagedProcess) -> None:
        """Supervisor hook: our llama-servers report to their runners; RPC workers change what we lend."""
        for loaded in list(self.loaded.values()):
            loaded.runner.on_process_change(mp)
        if mp.spec.name.startswith("rpc-worker"):
            self.publish()
            self.kick()

    # -- planning ---------------------------------------------------------------------

    def _place(self, extra: Wanted | None = None) -> Placement:
        members = self.mesh.members()
        records = {m.record.id: m.record for m in members}
        peers = [(m.record, m.rtt_ms) for m in members]
        held_everywhere = ledger([self.mesh.me] + [m.record for m in members])
        # what other hosts' splits hold here, for models this node has (a record naming it for anything else holds nothing),
        # counted only for the hosts this node's own plan lends to: anyone else's claim holds nothing here
        lends_to = {plan.host for model, plan in self.placement.plans.items()
                    if isinstance(plan, Standby) and plan.host in records and self._lends_to(records[plan.host], model) is None}
        others = ledger([self.mesh.me] + [m.record for m in members], hosts=lends_to)
        lent = {model: held for model, held in others.get(self.mesh.me.id, {}).items() if model in self.loaded}
        now = time.monotonic()
        self._unwilling = {k: t for k, t in self._unwilling.items() if now - t < UNWILLING_SECS}
        wanted = [self._wanted(loaded) for loaded in self.loaded.values() if loaded.life.phase not in (Phase.UNLOADING, Phase.GONE)]
        if extra is not None:
            wanted.append(extra)
        candidates = {  # a peer that claims our copy takes part once it has proven it holds it
            w.model: [c for c in peer_candidates(w.model, peers, held_everywhere) if (w.model, c.id) not in self._unwilling
                      and (c.fingerprint != w.fingerprint or self.proofs.proven(records[c.id], w.fingerprint))]
            for w in wanted
        }
        unloading = sum(loaded.here_bytes for loaded in self.loaded.values() if loaded.life.phase is Phase.UNLOADING)  # held till stopped
        return place(self.mesh.me.id, self.offer - unloading, self.engine_version, wanted, lent, candidates)

    def _wanted(self, loaded: Loaded) -> Wanted:
        shards = self._running_shards(loaded.name)
        plan = loaded.life.plan
        if isinstance(plan, Shards) and loaded.life.phase in (Phase.STARTING, Phase.READY):
            shards[plan.me] = plan.mine
        return wanted(loaded.spec, loaded.split, plan, shards)

    def _running_shards(self, model: str) -> dict[str, tuple[int, ...]]:
        """The experts each peer's shard of `model` runs (or loads) now, from gossip."""
        out = {}
        for m in self.mesh.members():
            for h in m.record.hosting:
                if h.name == model and h.shard and h.state in ("loading", "ready"):
                    out[m.record.id] = h.shard_experts
        return out

    async def replan(self) -> None:
        async with self._replanning:
            await self._replan()

    async def _replan(self) -> None:
        self._give_up_on_slow_workers()
        self._ask_proofs()
        self.placement = self._place()
        records = {m.record.id: m.record for m in self.mesh.members()}
        for name, plan in self.placement.plans.items():
            loaded = self.loaded.get(name)
            if loaded is None:
                continue
            loaded.here_bytes = self.placement.here.get(name, 0)
            for line in getattr(plan, "excluded", ()):
                self._say_once(f"{name}:{line}", line, warn=True)
            self.feed(name, Planned(plan, workers_ready=workers_ready(plan, name, records)))
        if self.workers is not None:
            self.workers.want("lend", self._lend_wanted(records.values()))
            await self.workers.reap()
        self.publish()

    def _give_up_on_slow_workers(self) -> None:
        now = time.monotonic()
        records = {m.record.id: m.record for m in self.mesh.members()}
        for loaded in self.loaded.values():
            since, plan = loaded.awaiting_workers_since, loaded.life.plan
            if since is None or now - since < LEND_WAIT_SECS or not isinstance(plan, Split):
                continue
            for w in plan.workers:
                if w not in records or loaded.name not in records[w].lending:
                    self._unwilling[(loaded.name, w)] = now
                    self.warn(f"{w[:8]} did not start its RPC worker for {loaded.name} within {LEND_WAIT_SECS:.0f} s: planning without it for {UNWILLING_SECS:.0f} s")
            loaded.awaiting_workers_since = None

    def _lend_wanted(self, records: Iterable[PeerRecord]) -> dict[str, Path]:
        """Our models that another node's split names this node for, when our own plan has that
        node host it and it has proven it holds our file: their workers must run."""
        me = self.mesh.me.id
        wanted = {}
        for r in records:
            for h in r.hosting:
                loaded = self.loaded.get(h.name)
                if (loaded is not None and h.holds_memory and any(s.node == me for s in h.split)
                        and self._lends_to(r, h.name) is None):
                    wanted[h.name] = loaded.spec.path
        return wanted

    def _lends_to(self, host: PeerRecord, model: str) -> str | None:
        """Why this node's own view does not lend its worker for `model` to `host` (None: it does)."""
        loaded = self.loaded.get(model)
        if loaded is None:
            return f"this node does not have {model}"
        plan = self.placement.plans.get(model)
        if not isinstance(plan, Standby) or plan.host != host.id:
            mine = f"{plan.host[:8]} hosts it" if isinstance(plan, Standby) else f"its plan is {type(plan).__name__.lower()}"
            return f"this node's plan for {model} does not lend to it ({mine})"
        if not self.proofs.proven(host, loaded.spec.fingerprint):
            return f"it has not proven it holds this node's copy of {model}"
        return None

    # -- file proofs ------------------------------------------------------------------

    def _ask_proofs(self) -> None:
        """Challenge every peer that claims one of our models: on disk as our copy, or hosted."""
        self.proofs.keep_only({(m.record.id, m.record.incarnation) for m in self.mesh.members()})
        for m in self.mesh.members():
            r = m.record
            if r.role == "client":
                continue
            claimed = {name: fp for name, fp in zip(r.models_on_disk, r.fingerprints, strict=False)}
            hosted = {h.name for h in r.hosting}
            for loaded in self.loaded.values():
                if loaded.life.phase in (Phase.UNLOADING, Phase.GONE):
                    continue
                if claimed.get(loaded.name) == loaded.spec.fingerprint or loaded.name in hosted:
                    self.proofs.ask(r, loaded.name, loaded.spec.path, loaded.spec.fingerprint)

    def _proof_done(self) -> None:
        self._routes_dirty.set()
        self.kick()

    def _route_refusal(self, peer: PeerRecord, model: str) -> str | None:
        """Why this node does not send `model`'s prompts to `peer` (None: it may). A node with the
        file routes only to peers that proved they hold it; one without cannot check."""
        loaded = self.loaded.get(model)
        if loaded is None or self.proofs.proven(peer, loaded.spec.fingerprint):
            return None
        return f"{peer.hostname or peer.id[:8]} has not proven it holds this node's copy of {model}"

    def model_path(self, model: str) -> Path | None:
        """The file of a model this node has (what it answers file challenges from)."""
        loaded = self.loaded.get(model)
        return loaded.spec.path if loaded is not None and loaded.life.phase is not Phase.GONE else None

    # -- what the mesh and the proxy see ------------------------------------------------

    def publish(self) -> None:
        """Our record in gossip and the proxy's table, from the models' states now."""
        hosting = tuple(self._hosted(loaded) for loaded in self.loaded.values() if loaded.life.phase in ADVERTISED)
        if self.workers is not None and self.settings is not None and not self.settings.gpu:
            # a CPU host holds its own share of a split through its own worker, for as long as the split runs
            self.workers.want("host", {loaded.name: loaded.spec.path for loaded in self.loaded.values()
                                       if isinstance(loaded.life.plan, Split) and loaded.life.phase in (Phase.STARTING, Phase.READY)})
        lending = self.workers.lent() if self.workers is not None else ()
        role = self.mesh.me.role
        if role != "client":
            role = "host" if hosting else "worker" if lending else "standby"
        offered = [loaded for loaded in self.loaded.values() if loaded.life.phase not in (Phase.UNLOADING, Phase.GONE)]  # can take part
        self.mesh.update_self(
            role=role, hosting=hosting, lending=lending, free_bytes=self.placement.free,
            models_on_disk=tuple(loaded.name for loaded in offered), fingerprints=tuple(loaded.spec.fingerprint for loaded in offered),
            rankings=tuple(shard_word(loaded) for loaded in offered),
        )
        self._routes_dirty.set()
        self.on_change()

    def _hosted(self, loaded: Loaded) -> HostedModel:
        spec, life, plan = loaded.spec, loaded.life, loaded.life.plan
        split: tuple[Slice, ...] = ()
        if isinstance(plan, Split):
            split = tuple(Slice(r.node, w, r.first, r.last, r.output) for r, w in zip(plan.layers, plan.weights, strict=True))
        ready = life.phase is Phase.READY
        sharded = isinstance(plan, Shards)  # runs without its draft
        return HostedModel(
            name=spec.model_id, state=life.phase.value, detail="" if ready else life.detail[:MAX_DETAIL],
            size_bytes=spec.info.file_size, need_bytes=plan.need if isinstance(plan, Shards) else spec.need, ctx=spec.ctx, split=split,
            draft=spec.draft.name if spec.draft and not sharded else "", draft_bytes=spec.draft.need if spec.draft and not sharded else 0,
            aliases=spec.aliases,
            experts=spec.info.n_experts, experts_used=spec.info.n_experts_used, expert_groups=spec.info.n_expert_groups,
            shard=experts_mask(plan.mine) if isinstance(plan, Shards) else "",
            tools=template_supports_tools(spec.info.metadata),
        )

    def _local_routes(self) -> dict[str, LocalRoute]:
        out = {}
        for loaded in self.loaded.values():
            if loaded.life.phase not in ROUTED:
                continue
            out[loaded.name] = LocalRoute(Server("local", _url(loaded), _ready(loaded), _words(loaded), lambda: 0.0, loaded.runner.gate), loaded.spec.aliases)
        return out

    def local_server(self, model: str) -> tuple[int, Gate] | None:
        """Where a peer's request for `model` goes: our llama-server while it is ready."""
        loaded = self.loaded.get(model)
        if loaded is None or loaded.life.phase is not Phase.READY or not loaded.runner.is_ready():
            return None
        return loaded.runner.server_port, loaded.runner.gate

    def lent_port(self, peer_id: str, model: str) -> int | str:
        """The RPC worker a peer may use, or why not: one lent for a model whose host in this
        node's own plan is that peer, which proved it holds our file and whose split names us
        (never the worker that holds this node's own share of a split it hosts)."""
        if self.workers is None or model not in self.workers.lent():
            return f"this node lends no RPC worker for {model}"
        member = next((m for m in self.mesh.members() if m.record.id == peer_id), None)
        if member is None:
            return "it is not a member"
        if (why := self._lends_to(member.record, model)) is not None:
            return why
        me = self.mesh.me.id
        if not any(h.name == model and any(s.node == me for s in h.split) for h in member.record.hosting):
            return f"its split of {model} does not name this node"
        port = self.workers.port(model)
        return port if port is not None else f"the RPC worker for {model} is not up"

    def _tell(self, loaded: Loaded, before: Life) -> None:
        """Say what a model is doing now, once per change of words."""
        life, plan = loaded.life, loaded.life.plan
        warn = life.phase in (Phase.WAITING, Phase.FAILED)
        if life.phase is Phase.READY and before.phase is not Phase.READY and (loaded.settled.done() or self.announced):
            line = "Now serving " + describe(loaded)
        elif life.phase is Phase.STARTING and life.running is not None and isinstance(plan, Split) and before.running != life.running:
            line = describe_split(plan, loaded.name)
        elif life.phase is Phase.STARTING and life.running is not None and isinstance(plan, Shards) and before.running != life.running:
            line = describe_shards(plan, loaded.name)
        elif isinstance(plan, Standby) and life.phase is Phase.STANDBY:
            note = f" ({plan.note})" if plan.note else ""
            line = f"{loaded.name} does not fit here: {plan.host[:8]} hosts the split; this node lends its worker{note}"
        elif life.phase is Phase.WAITING:
            line = life.detail
        elif life.phase is Phase.FAILED:
            line = f"{loaded.name}: {life.detail}"
        else:
            return
        self._say_once(loaded.name, line, warn)

    def _say_once(self, topic: str, line: str, warn: bool = False) -> None:
        if self._last_said.get(topic) != line:
            self._last_said[topic] = line
            (self.warn if warn else self.say)(line)

    # -- what status pages and the runtime API show ----------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for loaded in self.loaded.values():
            life, plan = loaded.life, loaded.life.plan
            doc: dict[str, Any] = {
                "model": loaded.name, "state": "ready" if life.phase is Phase.READY else life.detail, "phase": life.phase.value,
                "role": role_of(life), "need_bytes": loaded.spec.need, "here_bytes": loaded.here_bytes,
                "aliases": list(loaded.spec.aliases), "draft": loaded.spec.draft.name if loaded.spec.draft else None,
                **loaded.runner.snapshot(),
            }
            if isinstance(plan, Split):
                doc["split"] = split_doc(plan)
            elif isinstance(plan, Waiting):
                doc["waiting"] = {"need_bytes": plan.need, "have_bytes": plan.have, "excluded": list(plan.excluded)}
            elif isinstance(plan, Standby):
                doc["standby"] = {"host": plan.host, "note": plan.note}
            elif isinstance(plan, Shards):
                doc["shards"] = {"nodes": list(plan.nodes), "experts": [list(e) for e in plan.experts], "of": plan.of,
                                 "mine": list(plan.mine), "ranking": plan.ranking, "excluded": list(plan.excluded),
                                 "path": str(loaded.runner.shard_path) if loaded.runner.shard_path else None}
            out.append(doc)
        return out

    def budget(self) -> dict[str, int]:
        """The node's offer, what its plans hold of it (its models, its draft, its loans) and what is left."""
        return {"offer_bytes": self.offer, "used_bytes": self.offer - self.placement.free, "free_bytes": self.placement.free}

    def processes(self) -> list[dict[str, Any]]:
        out = []
        for loaded in self.loaded.values():
            server = loaded.runner.server
            if server is not None:
                out.append({"name": "llama-server", "model": loaded.name, "pid": server.pid, "state": server.state.value,
                            "port": loaded.runner.server_port, "restarts": server.restarts, "log": str(server.spec.log_path)})
        workers = self.workers
        for model, mp in workers.processes() if workers is not None else []:
            out.append({"name": "rpc-worker", "model": model, "pid": mp.pid, "state": mp.state.value,
                        "port": workers.port(model) if workers else None, "restarts": mp.restarts, "log": str(mp.spec.log_path)})
        return out


def wanted(spec: ModelSpec, split: SplitOptions, running: Plan | Unplannable | None = None,
           shards: dict[str, tuple[int, ...]] | None = None) -> Wanted:
    """What placement needs to know of a model. `running`: its last plan (a split's workers and shares are
    kept while they can be); `shards`: the experts each node's shard of it runs now."""
    keep, weights = (running.workers, running.weights) if isinstance(running, Split) else ((), ())
    return Wanted(spec.model_id, spec.need, spec.info.n_layers, spec.fingerprint, spec.draft.need if spec.draft else 0,
                  split.force_split, split.tensor_split, keep, weights, expert_facts(spec, split), shards or {})


def shard_word(loaded: Loaded) -> str:
    """What gossip says of this node and expert shards of a model: "" it takes no part, "s" it
    does with the file's order, else the order it measured (peers deal by the lowest id's)."""
    if expert_facts(loaded.spec, loaded.split) is None:
        return ""
    return wire_order(loaded.spec.ranking) if loaded.spec.ranking_measured else "s"


def expert_facts(spec: ModelSpec, split: SplitOptions = SplitOptions()) -> ExpertFacts | None:
    """An MoE model with a ranking whose experts can be cut may be sharded by experts, unless the
    user asked for layers (--split, --tensor-split); anything else cannot."""
    info = spec.info
    if not info.is_moe or len(spec.ranking) != info.n_experts or split.force_split or split.tensor_split is not None or unshardable(info):
        return None
    trunk, per_expert = expert_bytes(info)
    kv = max(0, spec.need - int(HEADROOM * info.file_size))
    return ExpertFacts(info.n_experts, info.n_experts_used, info.n_expert_groups, trunk, per_expert, kv,
                       spec.ranking, spec.ranking_measured, core_size(info.n_experts))


def workers_ready(plan: object, model: str, records: dict[str, PeerRecord]) -> bool:
    """For a split: every worker is a member that says its RPC worker for `model` is up."""
    return not isinstance(plan, Split) or all(w in records and model in records[w].lending for w in plan.workers)


def role_of(life: Life) -> str:
    plan = life.plan
    if isinstance(plan, Split):
        return "host"
    if isinstance(plan, Standby):
        return "standby"
    if isinstance(plan, Waiting):
        return "waiting"
    if isinstance(plan, Shards):
        return "shard"
    return "solo" if isinstance(plan, Solo) else "none"


def describe(loaded: Loaded) -> str:
    plan = loaded.life.plan
    if isinstance(plan, Split):
        return describe_split(plan, loaded.name)
    if isinstance(plan, Shards):
        return describe_shards(plan, loaded.name)
    return f"{loaded.name} solo"


def describe_shards(plan: Shards, model: str) -> str:
    return (f"{model} sharded by experts over {len(plan.nodes)} nodes: this node keeps {len(plan.mine)} of {plan.of} experts "
            f"({expert_ranges(plan.mine)}); no traffic between nodes while generating")


def expert_ranges(ids: tuple[int, ...]) -> str:
    """0, 1, 2, 5, 7, 8 -> '0–2, 5, 7–8'"""
    parts: list[str] = []
    for i in ids:
        if parts and parts[-1].split("–")[-1] == str(i - 1):
            parts[-1] = parts[-1].split("–")[0] + f"–{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


def describe_split(plan: Split, model: str) -> str:
    parts = [f"{'host ' if r.node == plan.host else 'worker '}{r.node[:8]} ({r})" for r in reversed(plan.layers)]
    return f"{model} split over {len(plan.layers)} nodes: " + ", ".join(parts) + f" — tensor split {format_tensor_split(plan.weights)}"


def _url(loaded: Loaded) -> Callable[[], str]:
    return lambda: f"http://127.0.0.1:{loaded.runner.server_port}"  # read per request: a relaunch moves the port


def _ready(loaded: Loaded) -> Callable[[], bool]:
    return lambda: loaded.life.phase is Phase.READY and loaded.runner.is_ready()


def _words(loaded: Loaded) -> Callable[[], str]:
    return lambda: "ready" if loaded.life.phase is Phase.READY else loaded.life.detail or loaded.life.phase.value


def template_supports_tools(metadata: Mapping[str, object]) -> bool:
    """Does the chat template llama-server uses for this model render tool definitions itself?
    Templates that do read the `tools` variable; without it llama-server still accepts tools but
    only through its generic JSON wrapper, which models were not trained on."""
    template = metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        fallback = fallback_chat_template(metadata)
        template = _packaged_template(fallback) if fallback else ""
    return re.search(r"\btools\b", template) is not None


@functools.lru_cache(maxsize=8)
def _packaged_template(path: Path) -> str:
    return path.read_text()
