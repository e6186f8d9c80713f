"""Runs this node's model as the plan says: solo, as the host of a split, or standing by.

One task owns the decision loop: it re-plans at start, on every mesh change and
when llama-server dies, and restarts llama-server only when the plan changed
(or the server failed). While it re-plans, the model answers 503 with the
reason; a split's host reaches its workers through RPC tunnels it opens, and
closing those tunnels is what ends a dead split at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from mesh_llm.api.proxy import Upstream, UpstreamTable
from mesh_llm.api.remote import RemoteModels
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.llama_server import ServerConfig, fallback_chat_template, is_embedding_model, server_argv
from mesh_llm.engine.probes import HealthProbe, free_loopback_port
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.peers import MAX_DETAIL, HostedModel, Slice
from mesh_llm.mesh.rpc_traffic import RpcTraffic
from mesh_llm.mesh.tunnels import TunnelListener
from mesh_llm.mesh.wire import StreamKind
from mesh_llm.models.gguf_file import GGUFInfo
from mesh_llm.plan.split import Candidate, Plan, Solo, Split, Standby, Waiting, format_tensor_split, kv_cache_bytes, plan_model, required_bytes

DEBOUNCE_SECS = 0.5  # a join brings several events; plan once
RETRY_SECS = 2.0  # after a failed start with an unchanged plan
RPC_DELAY_ENV = "MESH_LLM_RPC_DELAY_MS"  # injected latency on RPC tunnels, for benchmarks


@dataclass(frozen=True)
class Draft:
    """The speculative-decoding draft this node runs next to the model when it hosts it."""

    name: str
    path: Path
    need: int  # bytes it takes on the host: weights and its own KV cache
    max_tokens: int = 8
    device: str = "none"  # in a split: a local GPU, or "none" (this host's CPU); never the RPC workers


@dataclass
class RunnerConfig:
    model_id: str
    path: Path
    info: GGUFInfo
    fingerprint: str
    engine: EngineBinaries
    engine_version: str
    memory: int  # what this node offers
    gpu: bool  # llama.cpp sees a local GPU (it then holds the host's share, not our rpc-server)
    ctx_size: int
    device: str | None = None
    force_split: bool = False
    tensor_split: tuple[float, ...] | None = None
    log_dir: Path = Path("logs")
    draft: Draft | None = None

    @cached_property
    def need(self) -> int:
        return memory_need(self.info, self.ctx_size)


def memory_need(info: GGUFInfo, ctx: int) -> int:
    """Bytes a model takes to run: weights with headroom plus the KV cache."""
    heads = int(info.arch_value("attention.head_count", 1) or 1)
    kv_heads = info.arch_value("attention.head_count_kv", heads)
    kv = kv_cache_bytes(
        info.n_layers, ctx, heads,
        kv_heads if isinstance(kv_heads, list) else int(kv_heads),
        int(info.arch_value("embedding_length", 0) or 0),
        info.arch_value("attention.key_length"),  # type: ignore[arg-type]
        info.arch_value("attention.value_length"),  # type: ignore[arg-type]
    )
    return required_bytes(info.file_size, kv)


def plan_key(plan: Plan | None) -> tuple[Any, ...]:
    """What must stay equal for the running llama-server to stay up."""
    if isinstance(plan, Split):
        return ("split", plan.workers, plan.weights)
    if isinstance(plan, Standby):
        return ("standby", plan.host)
    if isinstance(plan, Waiting):
        return ("waiting",)  # nothing runs: new figures only update the message
    return ("solo",) if isinstance(plan, Solo) else ()


def describe_split(plan: Split, model: str) -> str:
    parts = [f"{'host ' if r.node == plan.host else 'worker '}{r.node[:8]} ({r})" for r in reversed(plan.layers)]
    return f"{model} split over {len(plan.layers)} nodes: " + ", ".join(parts) + f" — tensor split {format_tensor_split(plan.weights)}"


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, mesh: Mesh, supervisor: Supervisor, table: UpstreamTable, remote: RemoteModels,
                 own_rpc_port: Callable[[], int | None], say: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.cfg, self.mesh, self.supervisor, self.table, self.remote = cfg, mesh, supervisor, table, remote
        self.own_rpc_port, self.say, self.warn = own_rpc_port, say, warn
        self.plan: Plan | None = None
        self.state = "planning"  # a MODEL_STATES value, or "standby" while another node hosts
        self.phase = "planning"  # the same in words, for 503s and the console
        self.on_change: Callable[[], None] = lambda: None  # the console's status feed listens here
        self.server: ManagedProcess | None = None
        self.server_port = 0
        self.tunnels: dict[str, tuple[TunnelListener, RpcTraffic]] = {}
        self.first_outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._starting: asyncio.Task | None = None
        self._server_failed = False
        self._kick = asyncio.Event()
        self._probe: HealthProbe | None = None
        self._task: asyncio.Task | None = None
        self._weight_names = frozenset(t.name for t in cfg.info.tensors)
        self._last_message = ""
        self._excluded_told: set[str] = set()
        self.delay_s = float(os.environ.get(RPC_DELAY_ENV, "0") or 0) / 1000

    # -- what the proxy and status page see --------------------------------

    def is_ready(self) -> bool:
        return self.server is not None and self.server.state == ProcState.READY and isinstance(self.plan, (Solo, Split))

    def status(self) -> str:
        return "ready" if self.is_ready() else self.phase

    def hosted(self) -> HostedModel | None:
        """What gossip tells the mesh about our model; None while another node hosts it."""
        if self.state == "standby":
            return None
        plan, info = self.plan, self.cfg.info
        split: tuple[Slice, ...] = ()
        if isinstance(plan, Split):
            split = tuple(Slice(r.node, w, r.first, r.last, r.output) for r, w in zip(plan.layers, plan.weights, strict=True))
        ready = self.is_ready()
        return HostedModel(
            name=self.cfg.model_id, state="ready" if ready else self.state, detail="" if ready else self.phase[:MAX_DETAIL],
            size_bytes=info.file_size, need_bytes=self.cfg.need, ctx=self.cfg.ctx_size, split=split,
            draft=self.cfg.draft.name if self.cfg.draft else "",
        )

    def _set_phase(self, state: str, words: str = "") -> None:
        self.state, self.phase = state, words or state
        self._advertise()

    def _advertise(self) -> None:
        """One gossip update for every change: what we host, and whether it answers now."""
        hosted = self.hosted()
        self.mesh.update_self(hosting=(hosted,) if hosted else (), models_served=(self.cfg.model_id,) if self.is_ready() else ())
        self.on_change()

    def snapshot(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": self.cfg.model_id, "state": self.status(), "need_bytes": self.cfg.need, "memory_bytes": self.cfg.memory}
        plan = self.plan
        if isinstance(plan, Split):
            doc["split"] = {
                "host": plan.host,
                "workers": list(plan.workers),
                "tensor_split": list(plan.weights),
                "layers": [asdict(r) for r in plan.layers],
                "excluded": list(plan.excluded),
                "spares": list(plan.spares),
            }
        elif isinstance(plan, Waiting):
            doc["waiting"] = {"need_bytes": plan.need, "have_bytes": plan.have, "excluded": list(plan.excluded)}
        elif isinstance(plan, Standby):
            doc["standby"] = {"host": plan.host, "note": plan.note}
        doc["rpc_traffic"] = {peer: traffic.snapshot() for peer, (_, traffic) in self.tunnels.items()}
        return doc

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._teardown()

    def on_process_change(self, mp: ManagedProcess) -> None:
        """Supervisor hook: advertise readiness, notice a dead llama-server."""
        if mp is not self.server:
            return
        if mp.state == ProcState.FAILED:
            self._server_failed = True
            self._set_phase("planning", "re-planning: llama-server stopped")
            self._kick.set()
        elif mp.state == ProcState.READY:
            self._set_phase("ready")
        elif mp.state in (ProcState.STARTING, ProcState.RESTARTING):  # the supervisor brings a crashed solo server back
            self._set_phase("loading", "llama-server restarting")

    async def _loop(self) -> None:
        events = self.mesh.subscribe()
        await self._replan()
        while True:
            getter = asyncio.ensure_future(events.get())
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({getter, kicked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
                kicked.cancel()
            await asyncio.sleep(DEBOUNCE_SECS)
            while not events.empty():
                events.get_nowait()
            self._kick.clear()
            await self._replan()

    def _candidates(self) -> tuple[Candidate, list[Candidate]]:
        cfg = self.cfg
        room = cfg.memory - (cfg.draft.need if cfg.draft else 0)  # as host, the draft lives here too
        me = Candidate(self.mesh.me.id, max(room, 0), cfg.fingerprint, cfg.engine_version)
        peers = []
        for m in self.mesh.members():
            r = m.record
            if r.role == "client" or cfg.model_id not in r.models_on_disk or not r.engine_version:
                continue
            i = r.models_on_disk.index(cfg.model_id)
            fp = r.fingerprints[i] if i < len(r.fingerprints) else ""
            peers.append(Candidate(r.id, r.vram_bytes, fp, r.engine_version, m.rtt_ms))
        return me, peers

    def compute_plan(self) -> Plan:
        me, peers = self._candidates()
        keep = self.plan.workers if isinstance(self.plan, Split) else ()
        return plan_model(me, peers, model=self.cfg.model_id, need=self.cfg.need, n_layers=self.cfg.info.n_layers,
                          force_split=self.cfg.force_split, manual_split=self.cfg.tensor_split, keep=keep)

    async def _replan(self) -> None:
        try:
            plan = self.compute_plan()
        except ValueError as exc:  # a --tensor-split that does not fit the group
            self._report(f"cannot plan {self.cfg.model_id}: {exc}", warn=True)
            await self._teardown()  # whatever runs was planned for another group
            self.plan = None
            self._set_phase("error", f"cannot plan: {exc}")
            self._settle("error")
            return
        for line in getattr(plan, "excluded", ()):
            if line not in self._excluded_told:  # say each exclusion once, even if nothing restarts
                self._excluded_told.add(line)
                self.warn(line)
        failed, self._server_failed = self._server_failed, False
        if plan_key(plan) == plan_key(self.plan) and not failed:
            self.plan = plan  # same running shape; keep the fresher details (exclusions, have)
            if isinstance(plan, Waiting) and plan.message() != self.phase:
                self._set_phase("waiting", plan.message())
                self._report(plan.message(), warn=True)
            return
        if failed and plan_key(plan) == plan_key(self.plan):
            await asyncio.sleep(RETRY_SECS)
        was_serving = self.server is not None
        self._set_phase("planning", "re-planning" if was_serving else "planning")
        await self._teardown()
        self.plan = plan
        if isinstance(plan, Standby):
            self._set_phase("standby", f"hosted by {plan.host[:8]}")
            self._report(f"{self.cfg.model_id} does not fit here: {plan.host[:8]} hosts the split; this node lends its worker" + (f" ({plan.note})" if plan.note else ""))
            self.mesh.update_self(role="worker")
            self.table.remove(self.cfg.model_id)
            await self.remote.release(self.cfg.model_id)
            self._settle("standby")
            return
        await self.remote.claim(self.cfg.model_id)  # stop routing it to a peer
        self._add_upstream()
        self.mesh.update_self(role="host")
        if isinstance(plan, Waiting):
            self._set_phase("waiting", plan.message())
            self._report(plan.message(), warn=True)
            self._settle("waiting")
            return
        await self._launch(plan)

    async def _launch(self, plan: Solo | Split) -> None:
        cfg = self.cfg
        rpc: list[str] = []
        weights: tuple[float, ...] | None = None
        if isinstance(plan, Split):
            for peer in plan.workers:
                traffic = RpcTraffic(self._weight_names)
                tunnel = TunnelListener(self.mesh, peer, StreamKind.RPC, {"model": cfg.model_id}, traffic=traffic, delay_s=self.delay_s)
                await tunnel.start()
                self.tunnels[peer] = (tunnel, traffic)
                rpc.append(f"127.0.0.1:{tunnel.port}")
            weights = plan.weights
            if not cfg.gpu:  # a CPU host holds its share through its own worker, last in line
                own = self.own_rpc_port()
                if own is None:
                    self._set_phase("planning", "re-planning: this node's RPC worker is not running")
                    self._report("this node's RPC worker is not running; cannot host the split yet", warn=True)
                    self._server_failed = True  # try again on the next change or kick
                    self._kick.set()
                    return
                rpc.append(f"127.0.0.1:{own}")
            self._report(describe_split(plan, cfg.model_id))
        self.server_port = free_loopback_port()
        self._add_upstream()
        server_cfg = ServerConfig(
            model=cfg.path, alias=cfg.model_id, port=self.server_port, ctx_size=cfg.ctx_size, gpu=cfg.gpu,
            device=cfg.device if not rpc else None, rpc=tuple(rpc),
            tensor_split=format_tensor_split(weights) if weights else None,
            chat_template_file=fallback_chat_template(cfg.info.metadata), embeddings=is_embedding_model(cfg.info.metadata),
            draft=cfg.draft.path if cfg.draft else None,
            draft_max=cfg.draft.max_tokens if cfg.draft else 0,
            draft_device=cfg.draft.device if cfg.draft and rpc else None,  # solo: the draft follows the model's device
        )
        self._probe = HealthProbe(f"http://127.0.0.1:{self.server_port}/health")
        spec = ProcessSpec(
            name="llama-server",
            argv=server_argv(cfg.engine.llama_server, server_cfg),
            log_path=cfg.log_dir / "llama-server.log",
            health=self._probe,
            restart=isinstance(plan, Solo),  # a split's server is restarted by re-planning instead
        )
        self._set_phase("loading", "loading" if isinstance(plan, Solo) else f"loading split over {len(plan.layers)} nodes")
        self._starting = asyncio.ensure_future(self.supervisor.start(spec))
        self._starting.add_done_callback(self._started)

    def _started(self, task: asyncio.Task) -> None:
        if self._starting is task:
            self._starting = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.server = task.result()
            self._set_phase("ready")
            if self.first_outcome.done():  # later plans announce themselves; the first gets the banner
                self.say("Now serving " + (describe_split(self.plan, self.cfg.model_id) if isinstance(self.plan, Split) else f"{self.cfg.model_id} solo"))
            self._settle("ready")
            return
        reason = exc.reason if isinstance(exc, StartFailed) else str(exc)
        if isinstance(self.plan, Solo) and not self.first_outcome.done():
            self.first_outcome.set_exception(exc)
            return
        self._report(f"llama-server failed to start: {reason}; re-planning", warn=True)
        self._set_phase("planning", "re-planning: llama-server failed to start")
        self._server_failed = True
        self._kick.set()

    async def _teardown(self) -> None:
        """Stop the split's server and close its tunnels (closing them first ends a stuck server at once)."""
        for tunnel, _ in self.tunnels.values():
            await tunnel.close()
        self.tunnels.clear()
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
            self._starting = None
        if self.server is not None:
            server, self.server = self.server, None
            await self.supervisor.stop(server)
            self._advertise()
        if self._probe is not None:
            await self._probe.close()
            self._probe = None

    def _settle(self, outcome: str) -> None:
        if not self.first_outcome.done():
            self.first_outcome.set_result(outcome)

    def _add_upstream(self) -> None:
        """The proxy's entry for our model: 503 with `status()` until our llama-server is ready."""
        url = f"http://127.0.0.1:{self.server_port}"
        self.table.add(Upstream(self.cfg.model_id, url, is_ready=self.is_ready, status=self.status))

    def _report(self, line: str, warn: bool = False) -> None:
        """Say a line once (re-plans repeat themselves)."""
        if line != self._last_message:
            self._last_message = line
            (self.warn if warn else self.say)(line)
