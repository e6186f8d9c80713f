"""The one owner of child processes (llama-server, RPC workers).

It starts them in their own process group with a parent-death signal, so they
die with the node on Ctrl-C, SIGTERM or a crash of Python itself; waits until
they are healthy; restarts a crashed process with backoff and reports it; and
stops everything on shutdown. Logs go to files under the state dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

HealthCheck = Callable[[], Awaitable[bool]]

_PR_SET_PDEATHSIG = 1
FORGIVE_AFTER_S = 60.0
READY_POLL_SECS = 0.02  # how often a starting process is asked whether it is healthy (a model load waits on it)


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """preexec hook: the kernel SIGKILLs the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None

    def hook() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os._exit(1)

    return hook


class ProcState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    log_path: Path
    health: HealthCheck | None = None
    ready_timeout: float = 600.0
    env: dict[str, str] | None = None
    restart: bool = True
    health_interval: float = 5.0
    health_failures_to_restart: int = 3
    probe_when_running: bool = True  # False: `health` only gates readiness (an RPC worker
    # serves one client at a time, so a probe while a host is attached would hang)


class StartFailed(Exception):
    """The process exited or never became healthy before its first ready."""

    def __init__(self, name: str, reason: str, log_path: Path) -> None:
        super().__init__(f"{name} {reason} (log: {log_path})")
        self.name, self.reason, self.log_path = name, reason, log_path


def backoff_delay(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait before restart number `failures` (1, 2, 4, … capped)."""
    return min(cap, base * (2 ** max(0, failures - 1)))


def log_tail(path: Path, lines: int = 3) -> str:
    """Last non-empty lines of a log, for one-line error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


@dataclass
class ManagedProcess:
    spec: ProcessSpec
    state: ProcState = ProcState.STARTING
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    _task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


Reporter = Callable[[str], None]


class Supervisor:
    def __init__(self, report: Reporter | None = None, on_change: Callable[[ManagedProcess], None] | None = None) -> None:
        self._report = report or (lambda msg: print(msg, file=sys.stderr))
        self._on_change = on_change or (lambda mp: None)
        self._procs: list[ManagedProcess] = []
        self._stopping = False

    @property
    def processes(self) -> list[ManagedProcess]:
        return list(self._procs)

    async def start(self, spec: ProcessSpec) -> ManagedProcess:
        """Start `spec` and wait until it is healthy; raise StartFailed if it dies first."""
        mp = ManagedProcess(spec)
        self._procs.append(mp)
        try:
            await self._spawn_until_ready(mp)
        except BaseException:
            await self._terminate(mp)
            self._procs.remove(mp)
            raise
        mp._task = asyncio.create_task(self._watch(mp), name=f"watch-{spec.name}")
        return mp

    async def stop(self, mp: ManagedProcess, grace: float = 5.0) -> None:
        """SIGTERM, and SIGKILL if it is still there after `grace` seconds."""
        if mp._task:
            mp._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mp._task
        await self._terminate(mp, grace)
        self._set(mp, ProcState.STOPPED)
        if mp in self._procs:
            self._procs.remove(mp)

    async def stop_all(self) -> None:
        self._stopping = True
        await asyncio.gather(*(self.stop(mp) for mp in list(self._procs)), return_exceptions=True)

    def kill_all_now(self) -> None:
        """Synchronous last resort (atexit): SIGKILL every process group."""
        for mp in self._procs:
            if mp.proc and mp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(mp.proc.pid, signal.SIGKILL)

    # -- internals -------------------------------------------------------

    def _set(self, mp: ManagedProcess, state: ProcState) -> None:
        if mp.state != state:
            mp.state = state
            self._on_change(mp)

    async def _spawn(self, mp: ManagedProcess) -> None:
        spec = mp.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(spec.argv)}\n".encode())
            log.flush()
            env = {**os.environ, **(spec.env or {})}
            mp.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: we decide when it stops
                preexec_fn=_die_with_parent(os.getpid()),
            )

    async def _spawn_until_ready(self, mp: ManagedProcess) -> None:
        self._set(mp, ProcState.STARTING)
        await self._spawn(mp)
        assert mp.proc is not None
        deadline = time.monotonic() + mp.spec.ready_timeout
        while True:
            if mp.proc.returncode is not None:
                mp.last_exit = mp.proc.returncode
                tail = log_tail(mp.spec.log_path)
                raise StartFailed(mp.spec.name, f"exited with code {mp.proc.returncode} while starting: {tail}", mp.spec.log_path)
            if mp.spec.health is None or await _quiet(mp.spec.health):
                self._set(mp, ProcState.READY)
                return
            if time.monotonic() > deadline:
                raise StartFailed(mp.spec.name, f"did not become healthy within {mp.spec.ready_timeout:.0f}s", mp.spec.log_path)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(mp.proc.wait(), READY_POLL_SECS)

    async def _watch(self, mp: ManagedProcess) -> None:
        """Restart on exit (with backoff) and on repeated failed health checks."""
        failures = 0
        up_since = time.monotonic()
        while not self._stopping:
            code = await self._wait_exit_or_unhealthy(mp)
            if self._stopping:
                return
            mp.last_exit = code
            reason = f"exited with code {code}" if code is not None else "stopped answering health checks"
            if not mp.spec.restart:
                self._set(mp, ProcState.FAILED)
                self._report(f"{mp.spec.name} {reason}; not restarting (log: {mp.spec.log_path})")
                return
            # A process that stayed up for a while has its backoff forgiven.
            failures = 1 if time.monotonic() - up_since >= FORGIVE_AFTER_S else failures + 1
            delay = backoff_delay(failures)
            self._set(mp, ProcState.RESTARTING)
            self._report(f"{mp.spec.name} {reason}; restarting in {delay:.0f}s (log: {mp.spec.log_path})")
            await self._terminate(mp)
            await asyncio.sleep(delay)
            try:
                await self._spawn_until_ready(mp)
            except StartFailed as exc:
                self._report(f"restart failed: {exc}")
                up_since = time.monotonic()
                continue
            mp.restarts += 1
            up_since = time.monotonic()
            self._report(f"{mp.spec.name} is back (restart #{mp.restarts})")

    async def _wait_exit_or_unhealthy(self, mp: ManagedProcess) -> int | None:
        assert mp.proc is not None
        bad = 0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(mp.proc.wait()), mp.spec.health_interval)
            except TimeoutError:
                pass
            if mp.spec.health is None or not mp.spec.probe_when_running:
                continue
            if await _quiet(mp.spec.health):
                bad = 0
                self._set(mp, ProcState.READY)
            else:
                bad += 1
                if bad >= mp.spec.health_failures_to_restart:
                    return None

    async def _terminate(self, mp: ManagedProcess, grace: float = 5.0) -> None:
        proc = mp.proc
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except TimeoutError:
                continue


async def _quiet(check: HealthCheck) -> bool:
    try:
        return bool(await check())
    except Exception:
        return False
