"""Churn around a running split: members that do not touch it never restart it (real processes)."""

from __future__ import annotations

import pytest

from tests.conftest import LOCAL, wait_for
from tests.test_e2e_split import CTX, complete, need_gb, post_while_a_worker_dies, serving
from tests.test_metrics import scrape

pytestmark = pytest.mark.engine


def test_clients_standbys_and_spares_coming_and_going_never_restart_a_split(start_node, split_model) -> None:  # type: ignore[no-untyped-def]
    need = need_gb(split_model)
    host_cap, worker_cap = f"{0.40 * need:.6f}", f"{0.35 * need:.6f}"
    a = start_node("--model", str(split_model), *CTX, "--max-vram", host_cap, *LOCAL)
    a.wait_output("Waiting for more peers")
    token = a.token()
    workers_of = [start_node("--model", str(split_model), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL) for _ in range(2)]
    state = wait_for(lambda: serving(a)["state"] == "ready" and serving(a), timeout=60, what="3-node split ready")
    pid, workers, weights = a.llama_server().pid, state["split"]["workers"], state["split"]["tensor_split"]
    text = complete(a.port, "hello")

    def unchanged(after: str) -> None:
        now = serving(a)
        assert (a.llama_server().pid, now["split"]["workers"], now["split"]["tensor_split"]) == (pid, workers, weights), after
        assert complete(a.port, "hello") == text, after

    client = start_node("--join", a.wait_output("Client token: ").split("Client token: ", 1)[1].split()[0], *LOCAL)  # a client token
    client.wait_ready()
    assert complete(client.port, "hello") == text
    unchanged("a client joined")
    standby = start_node("--join", token, *LOCAL)  # no model: a standby
    standby.wait_output("ready")
    wait_for(lambda: standby.node_id() in a.peer_ids(), what="A sees the standby")
    unchanged("a standby joined")
    spares = [start_node("--model", str(split_model), *CTX, "--max-vram", worker_cap, "--join", token, *LOCAL) for _ in range(2)]
    for spare in spares:
        spare.wait_output("hosts the split")
        wait_for(lambda spare=spare: spare.node_id() in serving(a)["split"]["spares"], what="A plans with the spare")
    unchanged("two spares joined")
    for node, what in ((client, "the client"), (standby, "the standby"), (spares[0], "a spare")):
        gone = node.node_id()
        node.stop()
        wait_for(lambda gone=gone: gone not in a.peer_ids(), what=f"{what} gone")
        unchanged(f"{what} left")
    assert not [k for k in scrape(a.port) if k[0] == "mesh_llm_plan_restarts_total"]  # and /metrics says so

    # Losing a worker does change the split: the spare steps in, and /metrics names the cause. A
    # request stuck in llama-server when the worker dies (frozen first, so it surely is) is run
    # again on the new split: the caller gets the same answer as an uninterrupted run.
    victim = next(n for n in workers_of if n.node_id() in workers)
    status, doc = post_while_a_worker_dies(a, victim, {"prompt": "hello", "max_tokens": 24, "temperature": 0})
    assert status == 200 and doc["choices"][0]["text"] == text, doc
    assert spares[1].node_id() in serving(a)["split"]["workers"]
    metrics = scrape(a.port)
    restarts = {dict(k[1])["cause"]: v for k, v in metrics.items() if k[0] == "mesh_llm_plan_restarts_total"}
    assert restarts == {"workers changed": 1}, restarts
    assert metrics[("mesh_llm_resumes_total", (("model", "split-tiny"),))] == 1
    assert complete(a.port, "hello") == text
