"""`mesh-llm load | unload | drop | status | token`: the node running on this machine, over its API.

`load` fetches the model here first (a download shows its progress in this
terminal), then asks the node to serve it and follows it until it is ready.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich.console import Console

from mesh_llm.errors import UserError
from mesh_llm.models.commands import print_columns

LOAD_WAIT_SECS = 900.0  # a large model can take minutes to load


class Node:
    """The node listening on 127.0.0.1:port (or at `base`), over plain HTTP. `hint`: what to do when none answers."""

    NO_NODE_HINT = "start one (`mesh-llm --model NAME`, or `mesh-llm --join TOKEN` for one without a model) or pass --port"

    def __init__(self, port: int, base: str | None = None, hint: str = NO_NODE_HINT) -> None:
        self.port = port
        self.base = base or f"http://127.0.0.1:{port}"
        self.hint = hint

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                doc = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as err:
            raise UserError(self.error_text(err)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"no mesh-llm node answers on {self.base} ({reason}): {self.hint}") from None
        except ValueError:
            raise UserError(f"{self.base} did not answer with JSON: is it a mesh-llm node? (pass --port)") from None
        return doc if isinstance(doc, dict) else {}

    def error_text(self, err: urllib.error.HTTPError) -> str:
        return node_error_text(err)


def node_error_text(err: urllib.error.HTTPError, missing: str | None = None) -> str:
    """The node's one-line error; `missing`: what a 404 without one means (an older node lacking the route)."""
    try:
        doc = json.loads(err.read())
        message = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = None
    if err.code == 404 and message is None and missing:
        return missing
    return str(message or f"the node answered HTTP {err.code}")


def load_command(ref: str, port: int, wait: bool, out: Console) -> int:
    from mesh_llm.models.reference import LocalFile
    from mesh_llm.models.resolve import parse, resolve_model

    node = Node(port)
    if node.call("GET", "/api/runtime").get("client"):  # is a node there, and can it serve (before any download)?
        raise UserError(f"the node at {node.base} is a client: it runs no models (load it on a node started without --client)")
    found = resolve_model(ref, say=lambda line: out.print(line, markup=False, highlight=False), single_file=True)  # fetched here, with progress
    if isinstance(parse(ref), LocalFile):
        ref = str(found.path)  # the node resolves relative paths in its own folder, not ours
    started = node.call("POST", "/api/runtime/models", {"model": ref}, timeout=600)
    name = started.get("loaded", ref)
    out.print(f"Loading {name} on the node at {node.base}: {started.get('detail') or started.get('state')}", markup=False, highlight=False)
    if not wait:
        return 0
    deadline = time.monotonic() + LOAD_WAIT_SECS
    last = ""
    with out.status(f"Loading {name}…") as spinner:
        while time.monotonic() < deadline:
            model = next((m for m in node.call("GET", "/api/runtime")["models"] if m["model"] == name), None)
            if model is None:
                raise UserError(f"{name} left the node while it was loading (unloaded by someone else?)")
            phase = model["phase"]
            if phase == "ready":
                out.print(f"{name} is ready ({model['role']}); API: http://localhost:{port}/v1", markup=False, highlight=False)
                return 0
            if phase in ("waiting", "standby"):
                out.print(f"{name}: {model['state']}", markup=False, highlight=False)
                return 0
            if phase == "error" and model["role"] != "host":  # a split re-plans after a failure: keep following it
                raise UserError(f"{name} failed: {model['state']}")
            if model["state"] != last:
                last = model["state"]
                spinner.update(f"{name}: {last}…")
            time.sleep(0.2)
    raise UserError(f"{name} is still loading after {LOAD_WAIT_SECS:.0f} s: `mesh-llm status` shows where it stands")


def unload_command(name: str, port: int, out: Console) -> int:
    done = Node(port).call("DELETE", f"/api/runtime/models/{urllib.parse.quote(name, safe='')}", timeout=120)
    out.print(f"Unloaded {done.get('unloaded', name)}", markup=False, highlight=False)
    return 0


def status_command(port: int, out: Console) -> int:
    node = Node(port)
    runtime = node.call("GET", "/api/runtime")
    processes = node.call("GET", "/api/runtime/processes")["processes"]
    mesh = node.call("GET", "/api/status")
    budget = runtime["budget"]
    me = mesh["node"]
    out.print(f"This node {me['name']} ({me['id'][:8]}), {me['role']}: {gb(budget['offer_bytes'])} offered, "
              f"{gb(budget['used_bytes'])} in use, {gb(budget['free_bytes'])} free", markup=False, highlight=False)
    rows = []
    for m in runtime["models"]:
        server = next((p for p in processes if p["name"] == "llama-server" and p["model"] == m["model"]), None)
        rows.append((m["model"], m["role"], m["phase"], gb(m["here_bytes"]), str(m["port"] or "-"), str(server["pid"] if server else "-"),
                     str(m["requests"]), "" if m["phase"] == "ready" else m["state"]))
    if rows:
        print_columns(out, ("MODEL", "ROLE", "STATE", "MEMORY", "PORT", "PID", "REQUESTS", "DETAIL"), rows)
    else:
        out.print("No model runs here: `mesh-llm load NAME` gives it one.")
    workers = [p for p in processes if p["name"] == "rpc-worker"]
    if workers:
        out.print("RPC workers lent to splits:")
        print_columns(out, ("MODEL", "PID", "PORT", "STATE"), [(p["model"], str(p["pid"]), str(p["port"] or "-"), p["state"]) for p in workers])
    others = [n for n in mesh["nodes"] if not n["self"]]
    if others:
        out.print("Other nodes of the mesh:")
        print_columns(out, ("NODE", "ROLE", "MEMORY", "FREE", "SERVES", "RTT"),
              [(f"{n['name']} ({n['id'][:8]})", n["role"], gb(n["memory_bytes"]), gb(n["free_bytes"]), ", ".join(n["models_served"]) or "-",
                f"{n['rtt_ms']:.1f} ms" if n["rtt_ms"] is not None else "-") for n in others])
    return 0


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def token_command(port: int, client: bool, out: Console) -> int:
    """Print the running node's member token, or its client token (API use only)."""
    doc = Node(port).call("GET", "/api/status")
    token = doc.get("client_token" if client else "token")
    if not isinstance(token, str) or not token:
        if (doc.get("node") or {}).get("role") == "client":
            raise UserError(f"the node on port {port} is a client: it has no token to give; run `mesh-llm token` on a member of the mesh")
        raise UserError(f"the node on port {port} did not give its token: is it a mesh-llm node of this version? (pass --port)")
    out.print(token, markup=False, highlight=False, soft_wrap=True)
    return 0
