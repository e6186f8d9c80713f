"""A node serving a changing set of models: several at once, loaded and unloaded at runtime,
one memory budget, requests spread over the nodes that serve a model (real processes)."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from mesh_llm.api.routing import affinity
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import LOCAL, SPLIT_SPEC, assert_one_line_error, llama_servers, open_stream, run_cli, wait_for
from tests.test_e2e_split import need_gb

pytestmark = pytest.mark.engine
CTX = ("--ctx-size", "512")
LONG = ("--ctx-size", "16384")  # 4096 tokens a slot: a stream that lasts while the test looks
GEMMA = "gemma-3-270m-q4_k_m"


def call(url: str, method: str = "GET", body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """An HTTP call; the status and the JSON answer, errors included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def complete(node, model: str, prompt: str = "hi", max_tokens: int = 8, **extra) -> dict:  # type: ignore[no-untyped-def]
    status, doc = call(node.base_url + "/v1/completions", "POST", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert status == 200, doc
    return doc


def runtime(node) -> dict:  # type: ignore[no-untyped-def]
    return {m["model"]: m for m in call(node.base_url + "/api/runtime")[1]["models"]}


def wait_models_ready(node, *models: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    wait_for(lambda: all(runtime(node).get(m, {}).get("phase") == "ready" for m in models), timeout=timeout, what=f"{models} ready")


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("fleet")
    return [write_tiny_model(root / f"tiny-{i}.gguf", TinyModelSpec(seed=10 + i, name=f"tiny-{i}")) for i in range(3)]


@pytest.mark.gemma
def test_two_models_on_one_node_both_answer_and_a_crash_touches_only_one(start_node, tinies) -> None:
    node = start_node("--model", "gemma-3-270m", "--model", str(tinies[0]), *LOCAL)
    node.wait_output("ready —", timeout=300)
    wait_models_ready(node, GEMMA, "tiny-0")
    listed = [m["id"] for m in call(node.base_url + "/v1/models")[1]["data"]]
    assert listed == [GEMMA, "tiny-0"]
    # each model by its id, Gemma also by the name it was started with; streaming too
    assert "Au" in complete(node, "gemma-3-270m", "The chemical symbol for gold is")["choices"][0]["text"]
    assert complete(node, "tiny-0")["model"] == "tiny-0"
    req = urllib.request.Request(node.base_url + "/v1/completions", json.dumps({"model": "tiny-0", "prompt": "go", "max_tokens": 6, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [ln for ln in r.read().decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    # one budget: both models' memory is in use, each llama-server on its own port with its own log
    models = runtime(node)
    assert {m["role"] for m in models.values()} == {"solo"} and len({m["port"] for m in models.values()}) == 2
    budget = call(node.base_url + "/api/runtime")[1]["budget"]
    assert budget["free_bytes"] == budget["offer_bytes"] - sum(m["here_bytes"] for m in models.values())
    assert (node.state_dir / "logs" / f"llama-server-{GEMMA}.log").exists() and (node.state_dir / "logs" / "llama-server-tiny-0.log").exists()
    shown = run_cli("status", "--port", str(node.port))
    assert shown.returncode == 0 and GEMMA in shown.stdout and "tiny-0" in shown.stdout, shown.stderr

    # kill -9 of Gemma's llama-server: tiny-0 answers throughout, Gemma comes back on its own
    gemma = node.llama_server(GEMMA)
    answers, stop = [], threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            answers.append(call(node.base_url + "/v1/completions", "POST", {"model": "tiny-0", "prompt": "x", "max_tokens": 2})[0])

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        gemma.kill()
        wait_for(lambda: runtime(node)[GEMMA]["phase"] != "ready", what="Gemma restarting")
        wait_models_ready(node, GEMMA)
    finally:
        stop.set()
        asker.join()
    assert node.llama_server(GEMMA).pid != gemma.pid
    assert len(answers) > 3 and set(answers) == {200}, answers  # not one request of the other model failed
    assert "Au" in complete(node, GEMMA, "The chemical symbol for gold is")["choices"][0]["text"]


def test_a_standby_is_given_a_model_at_runtime_and_gives_it_back(start_node, tinies) -> None:
    a = start_node("--model", str(tinies[0]), *CTX, *LOCAL)
    a.wait_ready()
    b = start_node("--join", a.token(), *LONG, *LOCAL)  # runtime loads get its --ctx-size: streams long enough to watch
    b.wait_output("ready as a standby node")
    offer = call(b.base_url + "/api/runtime")[1]["budget"]["offer_bytes"]
    loaded = run_cli("load", str(tinies[1]), "--port", str(b.port))
    assert loaded.returncode == 0 and "tiny-1 is ready (solo)" in loaded.stdout, loaded.stdout + loaded.stderr
    assert sorted(m["id"] for m in call(b.base_url + "/v1/models")[1]["data"]) == ["tiny-0", "tiny-1"]
    assert complete(b, "tiny-1")["model"] == "tiny-1"
    wait_for(lambda: "tiny-1" in {m["name"] for m in a.status()["models"]}, what="A hears of tiny-1")
    assert complete(a, "tiny-1")["model"] == "tiny-1"  # and reaches it through the mesh
    server = b.llama_server("tiny-1")
    assert call(b.base_url + "/api/runtime")[1]["budget"]["free_bytes"] < offer

    # refused loads: one line from the CLI, the matching status from the API; nothing else changes
    notes = b.state_dir / "notes.gguf"
    notes.write_text("not a model\n" * 50)
    cases = [(str(notes), 400, "not a GGUF file"), (str(b.state_dir / "gone.gguf"), 404, "model file not found"),
             ("no-such-model-anywhere", 404, "unknown model"), (str(tinies[1]), 409, "tiny-1 is already loaded")]
    for ref, status, words in cases:
        assert_one_line_error(run_cli("load", ref, "--port", str(b.port)), words)
        got, doc = call(b.base_url + "/api/runtime/models", "POST", {"model": ref})
        assert got == status and words in doc["error"]["message"], (ref, got, doc)
    assert_one_line_error(run_cli("unload", "tiny-7", "--port", str(b.port)), "tiny-7 is not loaded on this node; loaded: tiny-1")
    assert_one_line_error(run_cli("unload", "tiny", "--port", str(b.port)), "tiny is not loaded")  # no guessing what to unload
    assert call(b.base_url + "/api/runtime/models/tiny-7", "DELETE")[0] == 404
    assert call(b.base_url + "/api/runtime/models", "POST", {"modle": "x"})[0] == 400
    assert_one_line_error(run_cli("status", "--port", "9"), "no mesh-llm node answers on http://127.0.0.1:9")

    # unload while two streams run, one from B's own API, one from A through the mesh: both finish
    # whole, then the process and the memory are gone
    pool = ThreadPoolExecutor(2)
    streams = [pool.submit(stream_all, b.port, "tiny-1", 3000), pool.submit(stream_all, a.port, "tiny-1", 3000)]
    wait_for(lambda: runtime(b)["tiny-1"]["in_flight"] == 2, what="both streams running")
    unloaded = run_cli("unload", "tiny-1", "--port", str(b.port))
    assert unloaded.returncode == 0 and "Unloaded tiny-1" in unloaded.stdout, unloaded.stderr
    for stream in streams:
        events = stream.result(timeout=120)
        assert events[-1] == "data: [DONE]" and sum(1 for e in events if '"text"' in e) >= 2900  # the whole answer arrived
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert [m["id"] for m in call(b.base_url + "/v1/models")[1]["data"]] == ["tiny-0"]
    assert runtime(b) == {} and call(b.base_url + "/api/runtime")[1]["budget"]["free_bytes"] == offer
    wait_for(lambda: b.status()["node"]["free_bytes"] == offer and "tiny-1" not in {m["name"] for m in a.status()["models"]},
             what="the memory back in gossip, the model gone from A's view")
    pool.shutdown()


def stream_all(port: int, model: str, tokens: int) -> list[str]:
    body = {"model": model, "prompt": "go", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return [ln.decode().strip() for ln in r if ln.startswith(b"data: ")]


def test_a_model_that_fits_neither_here_nor_in_the_mesh_is_refused_with_the_figures(start_node, tinies, tmp_path) -> None:
    from mesh_llm.models.gguf_file import inspect_model
    from mesh_llm.serving.prepare import memory_need

    need = memory_need(inspect_model(tinies[0]), 512)
    cap = f"{2.5 * need / 1e9:.6f}"  # room for two tiny models, not three
    node = start_node("--model", str(tinies[0]), "--model", str(tinies[1]), *CTX, "--max-vram", cap, *LOCAL)
    node.wait_output("ready —")
    wait_models_ready(node, "tiny-0", "tiny-1")
    status, doc = call(node.base_url + "/api/runtime/models", "POST", {"model": str(tinies[2])})
    assert status == 422, doc
    message = doc["error"]["message"]
    assert f"tiny-2 does not fit: it needs {need / 1e9:.2f} GB, this node has" in message and "the mesh cannot split it now" in message
    assert_one_line_error(run_cli("load", str(tinies[2]), "--port", str(node.port)), "tiny-2 does not fit")
    assert sorted(runtime(node)) == ["tiny-0", "tiny-1"]  # and both still serve
    assert complete(node, "tiny-0") and complete(node, "tiny-1")


def test_requests_for_a_model_spread_over_its_servers_and_a_conversation_stays(start_node, tinies) -> None:
    x, y = tinies[0], tinies[1]
    a = start_node("--model", str(x), *LONG, *LOCAL)
    a.wait_ready()
    token = a.token()
    b = start_node("--model", str(y), "--join", token, *LONG, *LOCAL)
    c = start_node("--model", str(x), "--model", str(y), "--join", token, *LONG, *LOCAL)
    b.wait_ready()
    c.wait_output("ready —")
    wait_models_ready(c, "tiny-0", "tiny-1")
    wait_for(lambda: sorted(b.status()["api"]["servers"]["tiny-0"]) == sorted([a.node_id(), c.node_id()]), what="B routes tiny-0 to A and C")

    def served() -> tuple[int, int]:
        return runtime(a)["tiny-0"]["requests"], runtime(c)["tiny-0"]["requests"]

    before = served()
    with ThreadPoolExecutor(6) as pool:  # at once: each goes where fewest are in flight
        list(pool.map(lambda i: complete(b, "tiny-0", max_tokens=64, ignore_eos=True), range(12)))
    on_a, on_c = (n - m for n, m in zip(served(), before, strict=True))
    assert on_a + on_c == 12 and on_a >= 3 and on_c >= 3, (on_a, on_c)

    # One conversation, one server (its prompt cache is there), even when that server is the busier:
    # alice starts somewhere; a long stream through B is then kept running on alice's server only.
    before = served()
    complete(b, "tiny-0", user="alice")
    home, away = (a, c) if served()[0] > before[0] else (c, a)
    busy = [open_stream(b.port, "tiny-0", 20000)]
    if runtime(home)["tiny-0"]["in_flight"] == 0:  # it went the other way: the next one goes home
        busy.append(open_stream(b.port, "tiny-0", 20000))
        busy.pop(0).close()
    wait_for(lambda: runtime(home)["tiny-0"]["in_flight"] == 1 and runtime(away)["tiny-0"]["in_flight"] == 0, what="a stream busy on alice's server only")
    before = served()
    for _ in range(4):
        complete(b, "tiny-0", user="alice")  # without stickiness each would go where nothing is in flight
    # a new conversation whose hash picks the other server does go there (conversations are
    # placed by rendezvous hashing over node ids, so the name is chosen for this run's ids)
    other = next(f"bob{i}" for i in range(1000) if affinity(f"u:bob{i}", away.node_id()) > affinity(f"u:bob{i}", home.node_id()))
    complete(b, "tiny-0", user=other)
    after = served()
    assert runtime(home)["tiny-0"]["in_flight"] == 1, "the busy stream ended early: nothing was shown"
    moved = {home: after[0 if home is a else 1] - before[0 if home is a else 1], away: after[0 if away is a else 1] - before[0 if away is a else 1]}
    assert (moved[home], moved[away]) == (4, 1), moved
    for stream in busy:
        stream.close()


def test_a_node_hosts_a_split_of_one_model_while_serving_another_solo(start_node, tinies, split_model) -> None:
    need_tiny, need_split = need_gb(tinies[0], 512), need_gb(split_model, 512)
    a = start_node("--model", str(tinies[0]), "--model", str(split_model), *CTX, "--max-vram", f"{need_tiny + 0.6 * need_split:.6f}", *LOCAL)
    a.wait_output("Waiting for more peers")
    b = start_node("--model", str(split_model), *CTX, "--max-vram", f"{0.45 * need_split:.6f}", "--join", a.token(), *LOCAL)
    b.wait_output("hosts the split")
    wait_models_ready(a, "tiny-0", SPLIT_SPEC.name, timeout=120)
    models = runtime(a)
    assert models["tiny-0"]["role"] == "solo" and models[SPLIT_SPEC.name]["role"] == "host"
    assert models[SPLIT_SPEC.name]["split"]["workers"] == [b.node_id()]
    assert complete(a, "tiny-0")["model"] == "tiny-0"
    wait_for(lambda: any(m["name"] == SPLIT_SPEC.name and m["ready"] for m in b.status()["models"]), what="B hears the split is ready")
    assert complete(a, SPLIT_SPEC.name)["choices"][0]["text"] == complete(b, SPLIT_SPEC.name)["choices"][0]["text"]
    # B lends one RPC worker, for that model only, and says so
    workers = [p for p in call(b.base_url + "/api/runtime/processes")[1]["processes"] if p["name"] == "rpc-worker"]
    assert [(p["model"], p["state"]) for p in workers] == [(SPLIT_SPEC.name, "ready")]
    assert b.status()["node"]["lending"] == [SPLIT_SPEC.name] and b.status()["node"]["role"] == "worker"
    assert len(llama_servers(a.proc.pid)) == 2 and llama_servers(b.proc.pid) == []
    # the split's share held on B is what A's plan put there; A's free memory is what both models leave
    budget = call(a.base_url + "/api/runtime")[1]["budget"]
    assert budget["free_bytes"] == budget["offer_bytes"] - models["tiny-0"]["here_bytes"] - models[SPLIT_SPEC.name]["here_bytes"]
    # what B lends to A's split is not B's to give again: tiny-1 would fit in B's offer, not beside the loan
    status, doc = call(b.base_url + "/api/runtime/models", "POST", {"model": str(tinies[1])})
    assert status == 422 and "tiny-1 does not fit" in doc["error"]["message"], doc
    b_budget = call(b.base_url + "/api/runtime")[1]["budget"]
    assert b_budget["used_bytes"] > 0.4 * need_split * 1e9 and b_budget["free_bytes"] < need_gb(tinies[1], 512) * 1e9
    b.stop(signal.SIGINT)
    wait_for(lambda: runtime(a)[SPLIT_SPEC.name]["phase"] == "waiting", what="A waits for another worker")
    assert complete(a, "tiny-0")["model"] == "tiny-0"  # the solo model never noticed
