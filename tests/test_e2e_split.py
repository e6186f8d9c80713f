"""Splitting one model over several real node processes (tiny model, capped memory, loopback mesh)."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from mesh_llm.plan.split import LayerRange, predict_layers
from tests.conftest import LOCAL, SPLIT_SPEC, wait_for

pytestmark = pytest.mark.engine

SPEC = SPLIT_SPEC
CTX = ("--ctx-size", "1024")
PROMPTS = ["The mesh", "hello", "Once upon a time"]


@pytest.fixture(scope="module")
def other_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same file name and shapes, different weights: must never join a split of the real one."""
    return write_tiny_model(tmp_path_factory.mktemp("other") / "split-tiny.gguf", TinyModelSpec(**{**SPEC.__dict__, "seed": 4}))


def need_gb(model: Path, ctx: int = 1024) -> float:
    from mesh_llm.serving.prepare import memory_need

    return memory_need(inspect_model(model), ctx) / 1e9


def complete(port: int, prompt: str, max_tokens: int = 24) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["text"]


def post_completion(port: int, body: dict) -> tuple[int, dict]:
    """POST /v1/completions; the status and JSON body, errors included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post_while_a_worker_dies(host, victim, body: dict) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    """POST a completion to `host` that is surely stuck inside its llama-server (the worker is
    frozen first) when the worker node is killed; the status and JSON body it gets."""
    tasks_before = host.llama_log().count("processing task")
    victim.proc.send_signal(signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post_completion, host.port, body)
        wait_for(lambda: host.llama_log().count("processing task") > tasks_before, what="the request reached llama-server")
        victim.proc.send_signal(signal.SIGKILL)
        return reply.result(timeout=120)


def serving(node, model: str = SPEC.name) -> dict:  # type: ignore[no-untyped-def]
    """The node's own view of one of its models (plan, split, RPC traffic)."""
    return next(m for m in node.status()["serving"] if m["model"] == model)


def assert_placement_as_predicted(state: dict, n_layers: int) -> None:
    """The layers each worker really received (seen in its RPC tunnel) are the predicted ones."""
    split = state["split"]
    predicted = predict_layers([r["node"] for r in split["layers"]], split["tensor_split"], n_layers)
    assert [LayerRange(**r) for r in split["layers"]] == list(predicted)
    for r in predicted:
        if r.node == split["host"]:
            continue
        traffic = state["rpc_traffic"][r.node]
        assert traffic["layers"] == list(range(r.first, r.last + 1)), (r, traffic)
        assert traffic["output"] == r.output
        assert traffic["weight_bytes"] == 0, traffic  # zero-transfer loading: read from the worker's own disk
        assert traffic["local_loads"] > 0


@pytest.fixture(scope="module")
def solo_text(split_model: Path, engine, tmp_path_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from tests.conftest import NodeProcess, free_port

    node = NodeProcess(["--model", str(split_model), *CTX, *LOCAL], tmp_path_factory.mktemp("solo"), free_port())
    try:
        node.wait_ready()
        return {p: complete(node.port, p) for p in PROMPTS}
    finally:
        node.stop()


def test_forced_two_node_split_with_manual_shares_matches_solo(start_node, split_model, solo_text) -> None:
    a = start_node("--model", str(split_model), *CTX, "--split", "--tensor-split", "1,3", *LOCAL)
    a.wait_output("Waiting for more peers")  # --split with nobody to split with
    b = start_node("--model", str(split_model), *CTX, "--split", "--max-vram", "1", "--join", a.token(), *LOCAL)
    b.wait_output("hosts the split")
    a.wait_ready()
    state = wait_for(lambda: serving(a)["state"] == "ready" and serving(a), what="2-node split ready")
    assert state["split"]["tensor_split"] == [1.0, 3.0]
    assert [(r["first"], r["last"], r["output"]) for r in state["split"]["layers"]] == [(0, 2, False), (3, 7, True)]
    for prompt, text in solo_text.items():
        assert complete(a.port, prompt) == text
        assert complete(b.port, prompt) == text  # B reaches the split through the mesh
    assert_placement_as_predicted(serving(a), SPEC.n_layers)

    # Several nodes at once: llama-server's parallel slots serve them side by side, each greedy
    # text still the one the model gives alone.
    asks = [(a.port, p) for p in PROMPTS] + [(b.port, p) for p in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda port_prompt: complete(*port_prompt), asks))
    assert texts == [solo_text[p] for _, p in asks]

    # The host leaves: B, forced to split with nobody left, takes the model over and waits.
    a.stop()
    wait_for(lambda: serving(b)["state"].startswith("Waiting for more peers"), timeout=30, what="B waits")
    with pytest.raises(urllib.error.HTTPError) as waiting:
        complete(b.port, "hello")
    assert waiting.value.code == 503 and "Waiting for more peers" in waiting.value.read().decode()


def stream_through(port: int, on_first_chunk) -> tuple[list[str], float]:  # type: ignore[no-untyped-def]
    """Stream a long completion; call `on_first_chunk` once; return every data line and when it ended."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"prompt": "hello", "max_tokens": 3000, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    lines: list[str] = []
    fired = False
    while line := resp.readline():
        text = line.decode().strip()
        if text.startswith("data: "):
            lines.append(text[6:])
            if not fired:
                on_first_chunk()
                fired = True
    conn.close()
    return lines, time.monotonic()


def test_three_nodes_hold_what_none_can_and_survive_losing_a_worker(start_node, split_model, other_copy, solo_text) -> None:
    need = need_gb(split_model)
    host_cap, worker_cap = f"{0.40 * need:.6f}", f"{0.35 * need:.6f}"
    a = start_node("--model", str(split_model), *CTX, "--max-vram", host_cap, *LOCAL)
    a.wait_output("Waiting for more peers")
    token = a.token()
    b = start_node("--model", str(split_model), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL)
    b.wait_output("hosts the split")
    wait_for(lambda: serving(a)["waiting"]["have_bytes"] > 0.7 * need * 1e9, what="A counts B")
    assert serving(a)["state"].startswith("Waiting for more peers — need")
    with pytest.raises(urllib.error.HTTPError) as waiting:
        complete(a.port, "hello")
    assert waiting.value.code == 503 and "Waiting for more peers" in waiting.value.read().decode()

    # A third node brings enough memory: the split starts on its own.
    c = start_node("--model", str(split_model), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL)
    state = wait_for(lambda: serving(a)["state"] == "ready" and serving(a), timeout=60, what="3-node split ready")
    assert len(state["split"]["workers"]) == 2
    server_pid = a.llama_server().pid
    for prompt, text in solo_text.items():
        assert complete(a.port, prompt) == text
        assert complete(c.port, prompt) == text
    assert_placement_as_predicted(serving(a), SPEC.n_layers)

    # A node whose file differs is left out, with the reason on both sides; a good spare joins too.
    d = start_node("--model", str(other_copy), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL)
    d.wait_output("differs")
    a.wait_output("left out: its copy of split-tiny differs")
    e = start_node("--model", str(split_model), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL)
    e.wait_output("hosts the split")
    e_id = e.node_id()
    wait_for(lambda: serving(a)["split"]["spares"] == [e_id], what="A plans with E as a spare")
    assert e_id not in serving(a)["split"]["workers"]
    assert a.llama_server().pid == server_pid  # neither the odd copy nor the spare restarted the split

    # kill -9 a worker mid-stream: the split re-forms with the spare, and the stream goes on there.
    victim = c if c.node_id() in serving(a)["split"]["workers"] else b
    killed_at = [0.0]

    def kill() -> None:
        victim.proc.send_signal(signal.SIGKILL)
        killed_at[0] = time.monotonic()

    lines, ended = stream_through(a.port, kill)
    assert lines[-1] == "[DONE]" and not [ln for ln in lines if "error" in ln], lines[-3:]
    state = wait_for(lambda: serving(a)["state"] == "ready" and serving(a), timeout=60, what="split re-formed")
    assert e_id in state["split"]["workers"] and d.node_id() not in state["split"]["workers"]
    for prompt, text in solo_text.items():
        assert complete(a.port, prompt) == text
    back = time.monotonic() - killed_at[0]
    print(f"worker loss → the stream finished {ended - killed_at[0]:.1f} s later → serving again after {back:.1f} s")
    assert_placement_as_predicted(serving(a), SPEC.n_layers)

    # A plain (non-streamed) request in flight when a worker dies gets the same JSON error.
    # The worker is frozen first, so the request is surely stuck inside llama-server when it dies.
    victim = next(n for n in (b, c, e) if n.proc.poll() is None and n.node_id() in serving(a)["split"]["workers"])
    status, doc = post_while_a_worker_dies(a, victim, {"prompt": "hello", "max_tokens": 200, "temperature": 0})
    assert status == 503, doc
    assert doc["error"]["type"] == "unavailable_error" and "retry shortly" in doc["error"]["message"], doc
