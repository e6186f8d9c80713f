"""The node on this machine, for commands that talk to one (launchers, blackboard, MCP).

`local_api` finds the node answering on a port, or starts a short-lived client node that
joins a mesh (the token given, else the one this machine last joined with) and stops it
afterwards. The client runs with a state dir of its own (a temporary one), so the user's
node key, mesh and last-join file are never touched, and in a session of its own, so a
Ctrl-C meant for an agent in the terminal does not reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mesh_llm.engine.supervisor import _die_with_parent
from mesh_llm.errors import UserError
from mesh_llm.mesh.identity import load_last_join
from mesh_llm.mesh.token import TokenError, decode_token
from mesh_llm.paths import default_state_dir

API_KEY_ENV = "MESH_LLM_API_KEY"  # a key for a node whose /v1 needs one (`mesh-llm auth key create`)
TOKEN_ENV = "MESH_LLM_TOKEN"  # how the client gets its token: out of argv, which every user can read
PROBE_TIMEOUT = 2.0
STOP_GRACE = 10.0  # seconds a client has to leave after SIGINT before it is killed

NO_NODE = ("no mesh-llm node answers on port {port} and this machine has joined no mesh yet: "
           "start one (mesh-llm --model M, or mesh-llm --client --join TOKEN) or pass --join TOKEN")


def auth_headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def get_json(url: str, timeout: float = PROBE_TIMEOUT) -> Any:
    """GET `url` and decode its JSON; raises OSError (URLError, HTTPError) or ValueError."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", **auth_headers()})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read(4 << 20))


def probe(base: str) -> str:
    """What answers at `base`: "node" (a mesh-llm node), "starting" (one that is not ready to
    answer yet), "other" (something else), "none" (nothing)."""
    try:
        status = get_json(base + "/api/status")
    except urllib.error.HTTPError as exc:
        return "starting" if exc.code == 503 else "other"  # our node answers /api/status to callers on this machine
    except (OSError, ValueError):
        return "none" if _refused(base) else "other"
    if not (isinstance(status, dict) and isinstance(status.get("node"), dict) and "mesh" in status):
        return "other"
    try:
        get_json(base + "/v1/models")
    except urllib.error.HTTPError as exc:
        if exc.code != 401:  # 401: a node whose /v1 needs a key; it is ours all the same
            return "other"
    except (OSError, ValueError):
        return "other"
    return "node"


def _refused(base: str) -> bool:
    """True when nothing listens at `base` (a connection is refused, not merely slow or odd)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=PROBE_TIMEOUT):
            return False
    except OSError:
        return True


def served_models(base: str) -> list[str]:
    """The ids /v1/models lists (empty while the mesh serves nothing, or on any error but a
    refused key, which is one line naming the fix)."""
    try:
        doc = get_json(base + "/v1/models")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(f"the node on {base} needs an API key: set {API_KEY_ENV}=KEY (make one with `mesh-llm auth key create`)") from None
        return []
    except (OSError, ValueError):
        return []
    data = doc.get("data") if isinstance(doc, dict) else None
    return [str(m["id"]) for m in data or [] if isinstance(m, dict) and m.get("id")]


@contextlib.contextmanager
def local_api(port: int = 9337, join: Sequence[str] = (), *, say: Callable[[str], None], need_model: bool = False,
              timeout: float = 120.0, state_dir: Path | None = None) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of the node on this machine answering on `port`; if none answers,
    start an ephemeral `mesh-llm --client --join TOKEN` (TOKEN: `join`, else the mesh this machine last joined) on that port,
    wait until it is ready (and, with need_model, until /v1/models lists a model), yield, and stop it on exit (SIGINT, then kill).
    No node and no token: UserError (one line: how to start a node or pass --join).

    `state_dir` is where the last-joined token is read from (default: the user's state dir)."""
    base = f"http://127.0.0.1:{port}"
    found = probe(base)
    if found == "starting":  # a node on its way up here: wait for it rather than start another
        say(f"Waiting for the mesh-llm node on {base} to start")
        deadline = time.monotonic() + timeout
        while (found := probe(base)) == "starting" and time.monotonic() < deadline:
            time.sleep(0.2)
        if found != "node":
            raise UserError(f"the node on port {port} did not finish starting within {timeout:g} s: see its output, or pass --port N")
    if found == "other":
        raise UserError(f"something that is not a mesh-llm node answers on port {port}: pass --port N of a node, or free the port")
    if found == "node":
        say(f"Using the mesh-llm node on {base}")
        if need_model:
            _wait_for_model(base, timeout, lambda: None)
        yield base
        return
    tokens = [t.strip() for t in join if t.strip()]
    for token in tokens:  # a bad token is one line here, not a client that starts and dies
        try:
            decode_token(token)
        except TokenError as exc:
            raise UserError(f"--join: {exc}") from None
    if not tokens:
        remembered = load_last_join((state_dir or default_state_dir()).expanduser())
        if remembered is None:
            raise UserError(NO_NODE.format(port=port))
        tokens = [remembered]
        say("No node runs here: starting a client node that joins the mesh this machine last joined")
    else:
        say("No node runs here: starting a client node that joins the mesh")
    with _client_node(port, tokens, timeout, say) as client:
        if need_model:
            _wait_for_model(base, timeout, client.check)
        yield base


class _Client:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def check(self) -> None:
        """UserError with the client's last log line if it has exited."""
        if self.proc.poll() is not None:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {self.proc.returncode}"
            last = last.removeprefix("mesh-llm: error: ")
            raise UserError(f"the client node stopped: {last} (log: {self.log})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def _client_node(port: int, tokens: list[str], timeout: float, say: Callable[[str], None]) -> Iterator[_Client]:
    tmp = Path(tempfile.mkdtemp(prefix="mesh-llm-client-"))  # 0700, ours
    log = tmp / "client.log"
    env = {**os.environ, TOKEN_ENV: " ".join(tokens)}
    env.pop("MESH_LLM_STATE_DIR", None)
    argv = [sys.executable, "-m", "mesh_llm", "--client", "--port", str(port), "--state-dir", str(tmp / "state")]
    client: _Client | None = None
    kept = False
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True,  # the terminal's Ctrl-C is for the agent, not for it
                                    preexec_fn=_die_with_parent(os.getpid()))  # and it never outlives us (Linux)
        client = _Client(proc, log)
        _wait_ready(f"http://127.0.0.1:{port}", timeout, client)
        say(f"Client node ready on http://127.0.0.1:{port}")
        yield client
    except UserError:
        kept = client is not None and client.proc.poll() is not None  # its log says why: keep it, not its state
        raise
    finally:
        if client is not None:
            client.stop()
        shutil.rmtree(tmp / "state" if kept else tmp, ignore_errors=True)


def _wait_ready(base: str, timeout: float, client: _Client) -> None:
    deadline = time.monotonic() + timeout
    while True:
        client.check()
        if probe(base) == "node":
            return
        if time.monotonic() > deadline:
            raise UserError(f"the client node was not ready after {timeout:g} s (log: {client.log})")
        time.sleep(0.2)


def _wait_for_model(base: str, timeout: float, check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not served_models(base):
        check()
        if time.monotonic() > deadline:
            raise UserError(f"the mesh serves no model yet (waited {timeout:g} s): start a node with --model M in it")
        time.sleep(0.3)
