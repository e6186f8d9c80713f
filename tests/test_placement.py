"""One memory budget for every model a node serves, and the ledger gossip gives (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.mesh.peers import HostedModel, PeerRecord, Slice
from mesh_llm.plan.budget import ledger, memory_for, used_bytes
from mesh_llm.plan.placement import Unplannable, Wanted, peer_candidates, place
from mesh_llm.plan.split import Candidate, Solo, Split, Standby, Waiting

GB = 10**9
ME, B, C = "a" * 64, "b" * 64, "c" * 64


def want(model: str, gb: float, **kw) -> Wanted:  # type: ignore[no-untyped-def]
    return Wanted(model, int(gb * GB), 8, "fp", **kw)


def test_models_are_placed_in_order_within_one_budget() -> None:
    p = place(ME, 10 * GB, "e", [want("x", 6), want("y", 3), want("z", 3)], {}, {})
    assert isinstance(p.plans["x"], Solo) and isinstance(p.plans["y"], Solo)
    assert isinstance(p.plans["z"], Waiting)  # 1 GB left, nobody to split with
    assert p.here == {"x": 6 * GB, "y": 3 * GB, "z": 0} and p.free == 1 * GB


def test_a_newer_model_never_pushes_out_an_older_one() -> None:
    p = place(ME, 10 * GB, "e", [want("old", 8), want("new", 8)], {}, {})
    assert isinstance(p.plans["old"], Solo) and not isinstance(p.plans["new"], Solo)


def test_what_is_left_is_what_a_split_gets_from_this_node() -> None:
    peers = {"big": [Candidate(B, 6 * GB, "fp", "e", 1.0)]}
    p = place(ME, 10 * GB, "e", [want("small", 6), want("big", 8)], {}, peers)
    assert p.plans["big"] == Standby(B)  # B has more to give than what small leaves here (6 > 4): it hosts
    p = place(ME, 16 * GB, "e", [want("small", 6), want("big", 12)], {}, {"big": [Candidate(B, 6 * GB, "fp", "e", 1.0)]})
    split = p.plans["big"]
    assert isinstance(split, Split) and split.host == ME and split.workers == (B,)
    assert p.here["big"] == round(12 * GB * split.weights[-1] / sum(split.weights))  # the host's share only
    assert p.free == 16 * GB - 6 * GB - p.here["big"]


def test_loans_to_other_hosts_come_off_every_other_model() -> None:
    lent = {"theirs": 5 * GB}  # another node's split of `theirs` holds 5 GB here
    p = place(ME, 10 * GB, "e", [want("theirs", 1), want("mine", 6)], lent, {})
    assert isinstance(p.plans["mine"], Waiting)  # 10 - 5 lent - 1 = 4 < 6
    assert isinstance(p.plans["theirs"], Solo)  # its own loan does not count against it
    assert p.free == 10 * GB - 5 * GB - 1 * GB


def test_the_draft_lives_next_to_the_model() -> None:
    p = place(ME, 10 * GB, "e", [want("m", 8, draft_need=3 * GB)], {}, {})
    assert isinstance(p.plans["m"], Waiting)  # 8 + 3 > 10
    p = place(ME, 12 * GB, "e", [want("m", 8, draft_need=3 * GB)], {}, {})
    assert isinstance(p.plans["m"], Solo) and p.here["m"] == 11 * GB


def test_a_tensor_split_that_does_not_fit_is_unplannable_not_a_crash() -> None:
    peers = {"m": [Candidate(B, 2 * GB, "fp", "e", 1.0)]}
    p = place(ME, 4 * GB, "e", [want("m", 5, manual_split=(1.0, 1.0, 1.0))], {}, peers)
    assert isinstance(p.plans["m"], Unplannable) and "--tensor-split needs 2" in p.plans["m"].reason and p.here["m"] == 0


def test_the_ledger_reads_every_hosts_record() -> None:
    split = (Slice(B, 1.0, 0, 3, False), Slice(ME, 3.0, 4, 7, True))
    me = PeerRecord(id=ME, hosting=(HostedModel("big", "ready", need_bytes=8 * GB, split=split), HostedModel("solo", "loading", need_bytes=2 * GB),
                                    HostedModel("later", "waiting", need_bytes=9 * GB), HostedModel("old", "unloading", need_bytes=1 * GB)))
    b = PeerRecord(id=B, hosting=(HostedModel("own", "ready", need_bytes=1 * GB),))
    held = ledger([me, b])
    assert held == {ME: {"big": 6 * GB, "solo": 2 * GB, "old": 1 * GB}, B: {"big": 2 * GB, "own": 1 * GB}}
    assert used_bytes(held, ME) == 9 * GB and used_bytes(held, C) == 0
    assert memory_for(5 * GB, held, B, "big") == 4 * GB  # a split never competes with itself
    assert memory_for(5 * GB, held, B, "other") == 2 * GB
    assert memory_for(2 * GB, held, B, "other") == 0  # never below nothing


def test_peer_candidates_need_the_model_an_engine_and_not_a_client() -> None:
    b = PeerRecord(id=B, role="standby", vram_bytes=6 * GB, engine_version="e", models_on_disk=("m", "n"), fingerprints=("f1", "f2"),
                   hosting=(HostedModel("n", "ready", need_bytes=2 * GB),))
    others = [PeerRecord(id=C, role="client", models_on_disk=("m",), engine_version="e"), PeerRecord(id="d" * 64, models_on_disk=("m",))]
    held = ledger([b, *others])
    [cand] = peer_candidates("m", [(b, 3.0), *((o, None) for o in others)], held)
    assert cand == Candidate(B, 4 * GB, "f1", "e", 3.0)  # 6 GB less what its model n holds


@given(st.integers(1, 64), st.lists(st.floats(0.1, 20.0), min_size=1, max_size=8))
def test_what_is_placed_never_exceeds_the_offer(offer_gb: int, sizes: list[float]) -> None:
    p = place(ME, offer_gb * GB, "e", [want(f"m{i}", s) for i, s in enumerate(sizes)], {}, {})
    assert sum(p.here.values()) + p.free == offer_gb * GB and p.free >= 0


def test_drafts_do_not_make_two_nodes_elect_each_other() -> None:
    """A 10 GB and B 9.5 GB, a 15 GB model with a 1 GB draft on both: one host, from either seat."""
    a, b = "a" * 64, "b" * 64
    plans = {}
    for me, offer, peer, peer_mem in ((a, 10 * GB, b, int(9.5 * GB)), (b, int(9.5 * GB), a, 10 * GB)):
        p = place(me, offer, "e", [want("x", 15, draft_need=1 * GB)], {}, {"x": [Candidate(peer, peer_mem, "fp", "e", 1.0)]})
        plans[me] = p.plans["x"]
    assert isinstance(plans[a], Split) and plans[a].host == a and plans[b] == Standby(a)
    split = plans[a]
    host_share = 15 * GB * split.weights[-1] / sum(split.weights)
    assert host_share <= 9 * GB  # the host's share leaves room for its draft


def test_a_running_split_keeps_its_shares_while_they_still_fit() -> None:
    peers = {"x": [Candidate(B, 9 * GB, "fp", "e", 1.0)]}
    first = place(ME, 10 * GB, "e", [want("x", 15)], {}, peers).plans["x"]
    assert isinstance(first, Split)
    # the worker's memory shrinks a little (another model of its own): same shares, no restart
    smaller = {"x": [Candidate(B, 8 * GB, "fp", "e", 1.0)]}
    kept = place(ME, 10 * GB, "e", [want("x", 15, keep=first.workers, keep_weights=first.weights)], {}, smaller).plans["x"]
    assert isinstance(kept, Split) and kept.weights == first.weights
    # it shrinks so far its share no longer fits: new shares
    tight = {"x": [Candidate(B, 6 * GB, "fp", "e", 1.0)]}
    moved = place(ME, 10 * GB, "e", [want("x", 15, keep=first.workers, keep_weights=first.weights)], {}, tight).plans["x"]
    assert isinstance(moved, Split) and moved.weights != first.weights


def test_the_ledger_counts_drafts_on_hosts_and_can_read_only_some_hosts() -> None:
    split = (Slice(B, 1.0, 0, 3, False), Slice(ME, 1.0, 4, 7, True))
    me = PeerRecord(id=ME, hosting=(HostedModel("big", "ready", need_bytes=8 * GB, draft_bytes=1 * GB, split=split),))
    b = PeerRecord(id=B, hosting=(HostedModel("own", "ready", need_bytes=2 * GB, draft_bytes=1 * GB),))
    assert ledger([me, b]) == {ME: {"big": 5 * GB}, B: {"big": 4 * GB, "own": 3 * GB}}
    assert ledger([me, b], hosts={ME}) == {ME: {"big": 5 * GB}, B: {"big": 4 * GB}}  # what ME's splits put where


def test_an_moe_model_no_node_holds_is_sharded_by_experts_and_otherwise_split_by_layers_with_the_reason() -> None:
    from mesh_llm.plan.experts import ExpertFacts
    from mesh_llm.plan.split import Shards

    facts = ExpertFacts(8, 2, 0, GB, GB, 0, tuple(range(8)), False, 4)  # 1 GB trunk, 8 experts of 1 GB: 9.9 GB whole
    moe = want("moe", 9.9, experts=facts)
    peers = {"moe": [Candidate(B, 9 * GB, "fp", "e", 1.0, shardable=True), Candidate(C, 9 * GB, "fp", "e", 1.0, shardable=True)]}
    p = place(ME, 9 * GB, "e", [moe], {}, peers)
    plan = p.plans["moe"]
    assert isinstance(plan, Shards) and plan.nodes == (ME, B, C)
    assert p.here["moe"] == plan.need == int(1.1 * (1 + len(plan.mine)) * GB)  # its shard, not the whole model
    # a model that fits runs whole; --split asks for layers
    assert isinstance(place(ME, 12 * GB, "e", [moe], {}, peers).plans["moe"], Solo)
    # a node whose model has no expert facts (--split asked for layers) plans a layer split
    assert isinstance(place(ME, 9 * GB, "e", [want("moe", 9.9, force_split=True)], {}, peers).plans["moe"], Standby)  # C hosts it
    # a draft does not change what a shard takes: it runs without one
    with_draft = place(ME, 9 * GB, "e", [want("moe", 9.9, experts=facts, draft_need=GB // 2)], {}, peers)
    assert with_draft.plans["moe"] == plan and with_draft.here["moe"] == plan.need
    # shards too big for the nodes: split by layers, and the plan says why
    small = {"moe": [Candidate(B, 4 * GB, "fp", "e", 1.0, shardable=True), Candidate(C, 4 * GB, "fp", "e", 1.0, shardable=True)]}
    split = place(ME, int(4.5 * GB), "e", [moe], {}, small).plans["moe"]  # this node hosts the split
    assert isinstance(split, Split)
    assert any("split by layers, not by experts" in line and "holds no shard" in line for line in split.excluded)
