"""The process owner, exercised with real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mesh_llm.engine import supervisor as sup
from mesh_llm.engine.supervisor import ProcessSpec, ProcState, StartFailed, Supervisor, backoff_delay, log_tail
from tests.mesh_helpers import wait_until


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def file_health(path: Path):
    async def check() -> bool:
        return path.exists()

    return check


def test_backoff_grows_and_caps() -> None:
    assert [backoff_delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_delay(50) == 30


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a\n\nb\nc\nd\n")
    assert log_tail(log, 2) == "c | d"
    assert log_tail(tmp_path / "missing.log") == ""


async def test_start_waits_for_health_and_stop_kills_group(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    # The child starts a grandchild; stopping must take both (process group).
    code = f"""
        import pathlib, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        time.sleep(0.3)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(300)
    """
    s = Supervisor(report=lambda m: None)
    mp = await s.start(ProcessSpec("child", py(code), tmp_path / "logs" / "child.log", health=file_health(ready)))
    assert mp.state == ProcState.READY and ready.exists()
    family = [psutil.Process(mp.pid)] + psutil.Process(mp.pid).children(recursive=True)
    assert len(family) == 2
    await s.stop_all()
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive
    assert mp.state == ProcState.STOPPED


async def test_a_process_that_ignores_sigterm_is_killed_once_its_grace_is_over(tmp_path: Path) -> None:
    # A split's llama-server cut off from its workers is stopped with a short grace (runner.SPLIT_STOP_GRACE_SECS).
    ready = tmp_path / "ready"
    code = f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(300)
    """
    s = Supervisor(report=lambda m: None)
    mp = await s.start(ProcessSpec("stubborn", py(code), tmp_path / "s.log", health=file_health(ready)))
    proc = mp.proc
    assert proc is not None
    await s.stop(mp, grace=0.2)
    assert proc.returncode == -9  # it sat out the SIGTERM; the SIGKILL after the grace ended it


async def test_exit_before_ready_raises_with_log_tail(tmp_path: Path) -> None:
    s = Supervisor(report=lambda m: None)
    spec = ProcessSpec("bad", py("import sys; print('error: model is broken'); sys.exit(3)"), tmp_path / "bad.log", health=file_health(tmp_path / "never"))
    with pytest.raises(StartFailed) as info:
        await s.start(spec)
    assert "exited with code 3" in str(info.value) and "model is broken" in str(info.value)
    assert s.processes == []


async def test_never_healthy_times_out(tmp_path: Path) -> None:
    s = Supervisor(report=lambda m: None)
    spec = ProcessSpec("slow", py("import time; time.sleep(60)"), tmp_path / "slow.log", health=file_health(tmp_path / "never"), ready_timeout=0.5)
    with pytest.raises(StartFailed, match="did not become healthy"):
        await s.start(spec)


async def test_crash_is_reported_and_restarted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sup, "backoff_delay", lambda n: 0.1 * n)
    messages: list[str] = []
    states: list[ProcState] = []
    s = Supervisor(report=messages.append, on_change=lambda mp: states.append(mp.state))
    mp = await s.start(ProcessSpec("worker", py("import time; time.sleep(300)"), tmp_path / "w.log", health_interval=0.1))
    first_pid = mp.pid
    os.kill(first_pid, signal.SIGKILL)
    await wait_until(lambda: mp.restarts == 1 and mp.state == ProcState.READY)
    assert mp.pid != first_pid
    assert mp.last_exit == -signal.SIGKILL
    assert any("exited with code -9; restarting" in m for m in messages)
    assert ProcState.RESTARTING in states
    await s.stop_all()


async def test_unhealthy_process_is_restarted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sup, "backoff_delay", lambda n: 0.05)
    flag = tmp_path / "healthy"
    flag.touch()
    messages: list[str] = []
    s = Supervisor(report=messages.append)
    spec = ProcessSpec("hang", py("import time; time.sleep(300)"), tmp_path / "h.log", health=file_health(flag), health_interval=0.05, health_failures_to_restart=2)
    mp = await s.start(spec)
    flag.unlink()  # now it "hangs"
    await wait_until(lambda: any("stopped answering health checks" in m for m in messages))
    flag.touch()
    await wait_until(lambda: mp.restarts >= 1 and mp.state == ProcState.READY)
    await s.stop_all()


def test_children_die_when_python_is_killed(tmp_path: Path) -> None:
    """kill -9 of the owning Python process must not leave its children running."""
    pidfile = tmp_path / "child.pid"
    owner = f"""
        import asyncio, sys, pathlib
        from mesh_llm.engine.supervisor import Supervisor, ProcessSpec
        async def main():
            s = Supervisor()
            mp = await s.start(ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], pathlib.Path({str(tmp_path / 's.log')!r})))
            pathlib.Path({str(pidfile)!r}).write_text(str(mp.pid))
            await asyncio.sleep(300)
        asyncio.run(main())
    """
    proc = subprocess.Popen(py(owner))
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pidfile.read_text()))
    assert child.is_running()
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs([child], timeout=5)
    assert not alive, "child outlived its killed owner"
