"""End to end: an MoE model that fits on no node, served by three nodes from their own expert shards.

Issue 17, step 7. Real node processes on loopback, each with its own cache (as separate machines
have) and a memory cap below the model's need: every node builds its shard from its own copy,
runs its own llama-server on it with no RPC at all, a conversation stays on one node whichever
node it enters by, and when that node is killed its conversation is answered by another without
restarting the shards that remain. Nodes whose measured rankings differ deal the experts by the
same one (the lowest id's); shards too big for the nodes fall back to the layer split, saying why.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import psutil
import pytest

from mesh_llm.models.expert_rank import rank_from_counts
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from mesh_llm.serving.prepare import memory_need
from tests.conftest import LOCAL, NodeProcess, wait_for

pytestmark = pytest.mark.engine

CTX = ("--ctx-size", "512")
SHARD_SPEC = TinyModelSpec(n_layers=4, n_embd=128, n_ff=256, n_experts=8, n_experts_used=2, seed=23, name="moe-8")


@pytest.fixture(scope="module")
def moe8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("moe8") / "moe-8.gguf", SHARD_SPEC)


def cap_gb(model: Path) -> str:
    """Nine tenths of what the whole model needs: no node holds it, a shard of 7 of its 8 experts fits."""
    return f"{0.9 * memory_need(inspect_model(model), 512) / 1e9:.6f}"


def own_cache(engine, tmp_path: Path, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A cache of its own (shards, rankings), as another machine has; the engine found through its folder."""
    return {"MESH_LLM_CACHE_DIR": str(tmp_path / f"cache-{name}"), "MESH_LLM_BIN_DIR": str(engine.llama_server.parent)}


def serving(node: NodeProcess) -> dict:
    (entry,) = node.status()["serving"]
    return entry


def complete(node: NodeProcess, user: str | None = None, tokens: int = 8) -> dict:
    doc = {"model": "moe-8", "prompt": "the cat sat", "max_tokens": tokens, "temperature": 0, **({"user": user} if user else {})}
    req = urllib.request.Request(node.base_url + "/v1/completions", json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def served_counts(nodes: list[NodeProcess]) -> list[int]:
    """Requests each node's own llama-server answered (from any node's proxy)."""
    return [serving(n)["requests"] for n in nodes]


def test_three_capped_nodes_serve_an_moe_model_none_can_hold_each_from_its_own_shard(engine, moe8: Path, start_node, tmp_path: Path) -> None:
    cap = cap_gb(moe8)
    a = start_node("--model", str(moe8), *CTX, "--max-vram", cap, *LOCAL, env=own_cache(engine, tmp_path, "a"))
    a.wait_output("Ranked the 8 experts", timeout=120)
    b = start_node("--model", str(moe8), *CTX, "--max-vram", cap, "--join", a.token(), *LOCAL, env=own_cache(engine, tmp_path, "b"))
    c = start_node("--model", str(moe8), *CTX, "--max-vram", cap, "--join", a.token(), *LOCAL, env=own_cache(engine, tmp_path, "c"))
    nodes = [a, b, c]
    for n in nodes:
        n.wait_ready(timeout=180)
    wait_for(lambda: all(serving(n)["phase"] == "ready" and serving(n)["role"] == "shard" and len(serving(n)["shards"]["nodes"]) == 3
                         for n in nodes), timeout=120, what="three shards ready")

    kept = {}
    for n in nodes:
        entry = serving(n)
        shards = entry["shards"]
        assert shards["of"] == 8 and len(shards["mine"]) < 8  # never everything
        kept[n.node_id()] = tuple(shards["mine"])
        # its own shard, built from its own copy into its own cache, run by its own llama-server without RPC
        argv = n.llama_server("moe-8").cmdline()
        shard = Path(argv[argv.index("-m" if "-m" in argv else "--model") + 1])
        assert shard == Path(shards["path"]) and shard.is_relative_to(tmp_path) and shard != moe8
        assert inspect_model(shard).n_experts == len(shards["mine"])
        assert "--rpc" not in argv
        assert entry["rpc_traffic"] == {}
        assert not [p for p in psutil.Process(n.proc.pid).children(recursive=True) if "rpc-server" in " ".join(p.cmdline())]
        assert "sharded by experts over" in n.output()
    assert set().union(*kept.values()) == set(range(8))  # every expert lives somewhere
    (fingerprint,) = json.loads((tmp_path / "cache-a" / "fingerprints.json").read_text()).values()
    ranking = json.loads((tmp_path / "cache-a" / "moe" / fingerprint[:16] / "ranking.json").read_text())["order"]
    assert set(ranking[:4]) <= set.intersection(*(set(k) for k in kept.values()))  # the four most used experts on every node
    pids = {n.node_id(): n.llama_server("moe-8").pid for n in nodes}

    # every node answers; nothing crosses the network while generating (no node lends an RPC worker)
    for n in nodes:
        assert complete(n)["usage"]["completion_tokens"] == 8
    assert all(not m["lending"] for n in nodes for m in n.status()["nodes"])

    # a conversation goes to one node whichever node it enters by
    before = served_counts(nodes)
    for n in (a, b, c, b):
        complete(n, user="alice")
    after = served_counts(nodes)
    grew = [i for i in range(3) if after[i] > before[i]]
    assert len(grew) == 1 and after[grew[0]] - before[grew[0]] == 4
    home = nodes[grew[0]]
    # different conversations spread over the nodes
    before = served_counts(nodes)
    for i in range(12):
        complete(a, user=f"user-{i}", tokens=2)
    after = served_counts(nodes)
    assert sum(1 for i in range(3) if after[i] > before[i]) >= 2

    # the node alice talks to is killed: another answers her, and the other shards keep running as they were
    home.stop(signal.SIGKILL)
    rest = [n for n in nodes if n is not home]
    for n in rest:
        n.wait_output("Peer left", timeout=30)
    entry_node = rest[0]
    answer = complete(entry_node, user="alice")
    assert answer["usage"]["completion_tokens"] == 8
    wait_for(lambda: all(len(serving(n)["shards"]["nodes"]) == 2 for n in rest), timeout=30, what="the shards planned without it")
    for n in rest:
        assert serving(n)["phase"] == "ready" and n.llama_server("moe-8").pid == pids[n.node_id()]
        assert tuple(serving(n)["shards"]["mine"]) == kept[n.node_id()]


def test_nodes_whose_measured_rankings_differ_deal_the_experts_by_the_same_one(engine, moe8: Path, start_node, tmp_path: Path) -> None:
    cap = cap_gb(moe8)
    env_a, env_b = own_cache(engine, tmp_path, "a"), own_cache(engine, tmp_path, "b")
    a = start_node("--model", str(moe8), *CTX, "--max-vram", cap, *LOCAL, env=env_a)
    a.wait_output("Ranked the 8 experts", timeout=120)
    # b's cache holds another measured ranking of the same file (as a near tie on another CPU would give)
    (fingerprint,) = json.loads((tmp_path / "cache-a" / "fingerprints.json").read_text()).values()
    own = json.loads((tmp_path / "cache-a" / "moe" / fingerprint[:16] / "ranking.json").read_text())
    other = rank_from_counts([100 * (i + 1) for i in range(8)])  # 7 hottest, then 6, …
    assert other.order != tuple(own["order"])
    planted = tmp_path / "cache-b" / "moe" / fingerprint[:16] / "ranking.json"
    planted.parent.mkdir(parents=True)
    planted.write_text(json.dumps({**own, "order": list(other.order), "counts": list(other.counts), "digest": other.digest}))
    b = start_node("--model", str(moe8), *CTX, "--max-vram", cap, "--join", a.token(), *LOCAL, env=env_b)
    b.wait_ready(timeout=180)
    nodes = [a, b]
    wait_for(lambda: all(serving(n)["role"] == "shard" and serving(n)["phase"] == "ready" and len(serving(n)["shards"]["nodes"]) == 2
                         for n in nodes), timeout=120, what="two shards ready")
    plans = [serving(n)["shards"] for n in nodes]
    assert plans[0]["ranking"] == plans[1]["ranking"] and plans[0]["experts"] == plans[1]["experts"]
    lowest = min(nodes, key=lambda n: n.node_id())
    winner = tuple(own["order"]) if lowest is a else other.order
    assert set(winner[:4]) <= set(plans[0]["experts"][0]) and set(winner[:4]) <= set(plans[0]["experts"][1])  # its core on both
    assert set(plans[0]["experts"][0]) | set(plans[0]["experts"][1]) == set(range(8))
    follower = b if lowest is a else a
    assert f"the experts are ranked as {lowest.node_id()[:8]} measured them" in follower.output()
    for n in nodes:
        assert complete(n)["usage"]["completion_tokens"] == 8
    # the node whose ranking the pair dealt by is killed: the other now ranks by its own, yet its
    # experts stay what they were, so it serves on alone without a restart or a rebuild
    pid, mine = follower.llama_server("moe-8").pid, serving(follower)["shards"]["mine"]
    lowest.stop(signal.SIGKILL)
    follower.wait_output("serving its shard alone", timeout=30)
    alone = serving(follower)["shards"]
    assert alone["nodes"] == [follower.node_id()] and alone["mine"] == mine and alone["ranking"] != plans[0]["ranking"]
    assert follower.llama_server("moe-8").pid == pid and serving(follower)["phase"] == "ready"
    assert complete(follower)["usage"]["completion_tokens"] == 8


def test_shards_too_big_for_the_nodes_fall_back_to_the_layer_split_and_say_why(engine, moe8: Path, start_node, tmp_path: Path) -> None:
    # 0.53 of the model's need on each of two nodes: together they hold it, but not even the core (4 of 8 experts) fits one
    cap = f"{0.53 * memory_need(inspect_model(moe8), 512) / 1e9:.6f}"
    a = start_node("--model", str(moe8), *CTX, "--max-vram", cap, *LOCAL, env=own_cache(engine, tmp_path, "a"))
    a.wait_output("Ranked the 8 experts", timeout=120)
    b = start_node("--model", str(moe8), *CTX, "--max-vram", cap, "--join", a.token(), *LOCAL, env=own_cache(engine, tmp_path, "b"))
    wait_for(lambda: any(serving(n)["role"] == "host" and serving(n)["phase"] == "ready" for n in (a, b)), timeout=180, what="a layer split")
    host = next(n for n in (a, b) if serving(n)["role"] == "host")
    line = next(line for line in host.output().splitlines() if "is split by layers, not by experts" in line)
    assert "holds no shard" in line and "4 of 8 experts" in line
    assert complete(a)["usage"]["completion_tokens"] == 8
