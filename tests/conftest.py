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


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1 and a single `mesh-llm: error:` line on stderr holding every fragment; no traceback."""
    assert result.returncode == 1, result
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

    def wait_output(self, marker: str, timeout: float = 60) -> str:
        """The first output line containing `marker`, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
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
