"""The one owner of this node's RPC workers: one ggml-rpc-server per model it lends.

A worker reads weights from its own copy of one GGUF file (our engine patch), so
there is one per model, started when a plan needs it: another node's split names
this node for that model, or this node hosts a split on its CPU (its own share
then goes through its own worker, last in line). It stops when no plan has
needed it for a little while, so a re-plan does not restart it. Workers bind
127.0.0.1 only; peers reach them through the mesh's RPC tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh_llm.engine.binaries import EngineBinaries
from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.engine.rpc_worker import rpc_hello, rpc_worker_argv, rpc_worker_env
from mesh_llm.engine.supervisor import ManagedProcess, ProcessSpec, ProcState, StartFailed, Supervisor

UNUSED_GRACE_SECS = 10.0  # a worker no plan wants is stopped after this (re-plans come and go)
READY_TIMEOUT_SECS = 60.0


@dataclass
class _Worker:
    model: str
    path: Path
    port: int
    reasons: set[str] = field(default_factory=set)  # "lend" (a host's split), "host" (our own CPU share)
    unused_since: float | None = None
    process: ManagedProcess | None = None
    starting: asyncio.Task[None] | None = None


class RpcWorkers:
    def __init__(self, supervisor: Supervisor, engine: EngineBinaries, device: str | None, log_dir: Path,
                 warn: Callable[[str], None], on_change: Callable[[], None]) -> None:
        self.supervisor, self.engine, self.device, self.log_dir = supervisor, engine, device, log_dir
        self.warn, self.on_change = warn, on_change
        self._workers: dict[str, _Worker] = {}

    # -- what others read ------------------------------------------------------

    def port(self, model: str) -> int | None:
        """The worker's loopback port while it is up, else None."""
        w = self._workers.get(model)
        return w.port if w and w.process is not None and w.process.state == ProcState.READY else None

    def lent(self) -> tuple[str, ...]:
        """Models whose worker is up for a host's split (what gossip's `lending` says); never one
        that holds this node's own share of a split it hosts (one worker serves one host)."""
        return tuple(m for m, w in self._workers.items() if w.reasons == {"lend"} and self.port(m) is not None)

    def processes(self) -> list[tuple[str, ManagedProcess]]:
        return [(m, w.process) for m, w in self._workers.items() if w.process is not None]

    # -- what plans ask --------------------------------------------------------

    def want(self, reason: str, models: Mapping[str, Path]) -> None:
        """Exactly `models` are wanted for `reason` now; workers start and stop to match."""
        now = time.monotonic()
        for model, path in models.items():
            w = self._workers.get(model)
            if w is None:
                w = self._workers[model] = _Worker(model, path, free_loopback_port())
            w.reasons.add(reason)
            w.unused_since = None
            if w.process is None and w.starting is None:
                w.starting = asyncio.ensure_future(self._start(w))
        for model, w in list(self._workers.items()):
            if model not in models:
                w.reasons.discard(reason)
            if not w.reasons and w.unused_since is None:
                w.unused_since = now

    async def wait_ready(self, model: str, timeout: float = READY_TIMEOUT_SECS) -> int | None:
        """The port once the model's worker is up (None if it failed or did not come up in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w = self._workers.get(model)
            if w is None or (w.process is None and w.starting is None):
                return None
            if (port := self.port(model)) is not None:
                return port
            await asyncio.sleep(0.05)
        return None

    async def reap(self) -> None:
        """Stop the workers nobody has wanted for the grace period."""
        now = time.monotonic()
        for model, w in list(self._workers.items()):
            if w.unused_since is not None and now - w.unused_since >= UNUSED_GRACE_SECS and self._workers.pop(model, None) is w:
                await self._stop(w)
                self.on_change()

    async def close(self) -> None:
        for w in list(self._workers.values()):
            await self._stop(w)
        self._workers.clear()

    # -- processes ---------------------------------------------------------------

    async def _start(self, w: _Worker) -> None:
        async def answers() -> bool:
            return await rpc_hello(w.port) is not None

        spec = ProcessSpec(
            name=f"rpc-worker {w.model}",
            argv=rpc_worker_argv(self.engine.rpc_server, w.port, self.device),
            log_path=self.log_dir / f"rpc-worker-{w.model}.log",
            env=rpc_worker_env(w.path),
            health=answers,
            probe_when_running=False,  # it serves one host at a time: never probe while one is attached
            ready_timeout=READY_TIMEOUT_SECS,
        )
        try:
            w.process = await self.supervisor.start(spec)
        except StartFailed as exc:
            self.warn(f"the RPC worker for {w.model} failed to start: {exc.reason} (log: {exc.log_path})")
        except OSError as exc:  # no such binary, too many open files: the same one line
            self.warn(f"the RPC worker for {w.model} could not be started: {exc}")
        finally:
            w.starting = None
        self.on_change()

    async def _stop(self, w: _Worker) -> None:
        if w.starting is not None:
            w.starting.cancel()
            with contextlib.suppress(BaseException):
                await w.starting
        if w.process is not None:
            await self.supervisor.stop(w.process)
            w.process = None
