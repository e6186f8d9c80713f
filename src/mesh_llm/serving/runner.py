"""Carries out one model's actions: its llama-server, and for a split the RPC tunnels to
its workers. It decides nothing: the fleet steps the model's lifecycle and hands
over the actions; what happens to the process comes back as lifecycle events.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mesh_llm.api.proxy import Gate
from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.llama_server import ServerConfig, fallback_chat_template, is_embedding_model, server_argv
from mesh_llm.engine.probes import HealthProbe, free_loopback_port
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor
from mesh_llm.mesh.mesh import Mesh
from mesh_llm.mesh.rpc_traffic import RpcTraffic
from mesh_llm.mesh.tunnels import TunnelListener
from mesh_llm.mesh.wire import StreamKind
from mesh_llm.models.gguf_file import GGUFInfo
from mesh_llm.models.moe_shard import ShardCancelled, ensure_shard
from mesh_llm.plan.split import Shards, Solo, Split, format_tensor_split
from mesh_llm.serving.lifecycle import Event, ServerDown, ServerRestarting, ServerUp, plan_key
from mesh_llm.serving.workers import RpcWorkers

SPLIT_STOP_GRACE_SECS = 0.5  # a split's llama-server stopped for a re-plan: SIGKILL after this


@dataclass(frozen=True)
class Draft:
    """The speculative-decoding draft that runs next to a model on its host."""

    name: str
    path: Path
    need: int  # bytes it takes on the host: weights and its own KV cache
    max_tokens: int = 8
    device: str = "none"  # in a split: a local GPU, or "none" (this host's CPU); never the RPC workers


@dataclass(frozen=True)
class ModelSpec:
    """One model this node serves, as it was loaded."""

    model_id: str
    path: Path
    info: GGUFInfo
    fingerprint: str
    need: int  # weights with headroom plus KV cache
    ctx: int
    aliases: tuple[str, ...] = ()  # names it was asked for by, besides its id
    draft: Draft | None = None
    ranking: tuple[int, ...] = ()  # MoE that may be sharded: its experts, hottest first
    ranking_measured: bool = False  # from routing statistics (gossiped, so peers can adopt it), not the file's order


@dataclass(frozen=True)
class EngineSettings:
    """How this node runs llama-server, the same for every model."""

    engine: EngineBinaries
    gpu: bool  # llama.cpp sees a local GPU (it then holds a split host's share, not our RPC worker)
    device: str | None = None
    log_dir: Path = Path("logs")
    rpc_delay_s: float = 0.0  # injected latency in the host's RPC tunnels (benchmarks)


class ModelRunner:
    def __init__(self, spec: ModelSpec, settings: EngineSettings, mesh: Mesh, supervisor: Supervisor, workers: RpcWorkers,
                 feed: Callable[[Event], None]) -> None:
        self.spec, self.settings, self.mesh, self.supervisor, self.workers = spec, settings, mesh, supervisor, workers
        self.feed = feed
        self.gate = Gate()  # requests at this model's llama-server, from this node's proxy and from peers
        self.server: ManagedProcess | None = None
        self.server_port = 0
        self.key: tuple[Any, ...] | None = None  # the plan the current llama-server runs
        self.tunnels: dict[str, tuple[TunnelListener, RpcTraffic]] = {}
        self._starting: asyncio.Task[None] | None = None
        self._probe: HealthProbe | None = None
        self._weight_names = frozenset(t.name for t in spec.info.tensors)
        self.shard_path: Path | None = None  # the expert shard the server runs, when it runs one
        self._cancel_build: threading.Event | None = None  # set to call off a shard build in its thread

    def is_ready(self) -> bool:
        return self.server is not None and self.server.state == ProcState.READY

    @property
    def log_path(self) -> Path:
        return self.settings.log_dir / f"llama-server-{self.spec.model_id}.log"

    # -- actions ---------------------------------------------------------------

    async def launch(self, plan: Solo | Split | Shards) -> None:
        """Start llama-server for `plan` in the background; its outcome comes back as an event."""
        key = plan_key(plan)
        self.key = key
        if isinstance(plan, Shards):  # its shard is built (or found) first, off the event loop
            self._starting = asyncio.ensure_future(self._start_shard(plan, key))
            return
        spec, settings = self.spec, self.settings
        rpc: list[str] = []
        weights: tuple[float, ...] | None = None
        if isinstance(plan, Split):
            for peer in plan.workers:
                traffic = RpcTraffic(self._weight_names)
                tunnel = TunnelListener(self.mesh, peer, StreamKind.RPC, {"model": spec.model_id}, traffic=traffic, delay_s=settings.rpc_delay_s,
                                        on_refused=self._refused_by(peer))
                await tunnel.start()
                self.tunnels[peer] = (tunnel, traffic)
                rpc.append(f"127.0.0.1:{tunnel.port}")
            weights = plan.weights
            if not settings.gpu:  # a CPU host holds its share through its own worker, last in line
                own = await self.workers.wait_ready(spec.model_id)
                if own is None:
                    self.feed(ServerDown(key, "this node's RPC worker for the model did not start"))
                    return
                rpc.append(f"127.0.0.1:{own}")
        self._starting = asyncio.ensure_future(self._start(self._server_process(spec.path, rpc, weights, isinstance(plan, Solo)), key))

    async def _start_shard(self, plan: Shards, key: tuple[Any, ...]) -> None:
        spec = self.spec
        cancel = self._cancel_build = threading.Event()
        try:
            path = await asyncio.to_thread(ensure_shard, spec.path, spec.fingerprint, plan.mine, self.mesh.log, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next tensor and removes its temporary file
            raise
        except Exception as exc:  # any failure must come back as an event, or the model waits forever
            self._starting = None
            if not isinstance(exc, ShardCancelled):
                self.feed(ServerDown(key, f"its expert shard could not be built: {exc.__class__.__name__}: {exc}"))
            return
        self.shard_path = path
        await self._start(self._server_process(path, [], None, restart=True, draft=False), key)

    def _server_process(self, model: Path, rpc: list[str], weights: tuple[float, ...] | None, restart: bool,
                        draft: bool = True) -> ProcessSpec:
        """`draft`: with the model's draft (an expert shard runs without one: its budget has no room planned for it)."""
        spec, settings = self.spec, self.settings
        self.server_port = free_loopback_port()
        draft_model = spec.draft if draft else None
        config = ServerConfig(
            model=model, alias=spec.model_id, port=self.server_port, ctx_size=spec.ctx, gpu=settings.gpu,
            device=settings.device if not rpc else None, rpc=tuple(rpc),
            tensor_split=format_tensor_split(weights) if weights else None,
            chat_template_file=fallback_chat_template(spec.info.metadata), embeddings=is_embedding_model(spec.info.metadata),
            draft=draft_model.path if draft_model else None,
            draft_max=draft_model.max_tokens if draft_model else 0,
            draft_device=draft_model.device if draft_model and rpc else None,  # solo: the draft follows the model's device
        )
        self._probe = HealthProbe(f"http://127.0.0.1:{self.server_port}/health")
        return ProcessSpec(
            name=f"llama-server {spec.model_id}",
            argv=server_argv(settings.engine.llama_server, config),
            log_path=self.log_path,
            health=self._probe,
            restart=restart,  # a split's server is restarted by re-planning instead
        )

    async def _start(self, process: ProcessSpec, key: tuple[Any, ...]) -> None:
        try:
            self.server = await self.supervisor.start(process)
        except StartFailed as exc:
            self.feed(ServerDown(key, f"llama-server failed to start: {exc.reason} (log: {exc.log_path})"))
            return
        except OSError as exc:  # it could not even be spawned (no binary, no file handles, no log dir)
            self.feed(ServerDown(key, f"llama-server could not be started: {exc}"))
            return
        finally:
            self._starting = None
        self.feed(ServerUp(key))

    async def stop(self) -> None:
        """Stop llama-server and close the split's tunnels (closing them first ends a stuck server at once)."""
        self.key = None
        if self._cancel_build is not None:
            self._cancel_build.set()
        # A split's llama-server whose workers are cut off can sit out a whole SIGTERM grace
        # (measured: 5 s of the 7 s from a worker's kill -9 to serving again); nothing in it is
        # worth waiting for, so it gets a short one.
        grace = SPLIT_STOP_GRACE_SECS if self.tunnels else 5.0
        for tunnel, _ in self.tunnels.values():
            await tunnel.close()
        self.tunnels.clear()
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
            self._starting = None
        try:
            if self.server is not None:
                server, self.server = self.server, None
                await self.supervisor.stop(server, grace)
        finally:
            if self._probe is not None:
                await self._probe.close()
                self._probe = None

    def on_process_change(self, mp: ManagedProcess) -> None:
        """Supervisor news about our llama-server, as lifecycle events."""
        if mp is not self.server or self.key is None:
            return
        if mp.state == ProcState.READY:
            self.feed(ServerUp(self.key))
        elif mp.state in (ProcState.STARTING, ProcState.RESTARTING):  # the supervisor brings a crashed solo server back
            self.feed(ServerRestarting(self.key, f"exited with code {mp.last_exit}"))
        elif mp.state == ProcState.FAILED:
            self.feed(ServerDown(self.key, f"llama-server exited with code {mp.last_exit}"))

    def _refused_by(self, peer: str) -> Callable[[str], None]:
        def say(why: str) -> None:
            self.mesh.log(f"{peer[:8]} refused the RPC stream for {self.spec.model_id} ({why}): llama-server cannot use that worker")
        return say

    # -- what status pages see -------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "port": self.server_port if self.server is not None else None,
            "pid": self.server.pid if self.server is not None else None,
            "requests": self.gate.served,
            "in_flight": self.gate.in_flight,
            "rpc_traffic": {peer: traffic.snapshot() for peer, (_, traffic) in self.tunnels.items()},
        }


def split_doc(plan: Split) -> dict[str, Any]:
    return {
        "host": plan.host,
        "workers": list(plan.workers),
        "tensor_split": list(plan.weights),
        "layers": [asdict(r) for r in plan.layers],
        "excluded": list(plan.excluded),
        "spares": list(plan.spares),
    }
