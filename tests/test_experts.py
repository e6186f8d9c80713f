"""Expert assignment for MoE shards (pure)."""

from __future__ import annotations

import itertools

import pytest

from mesh_llm.plan.experts import NotShardable, assign_experts, core_size, default_ranking, overlap_for


def test_core_size_is_the_catalog_minimum_or_half() -> None:
    assert core_size(128) == 64 and core_size(7) == 4 and core_size(128, catalog_min=46) == 46 and core_size(8, catalog_min=20) == 8


@pytest.mark.parametrize(("n_experts", "n_nodes", "core"), [(e, n, c) for e in (4, 8, 9, 16) for n in (1, 2, 3, 5) for c in (1, 2, e // 2, e)])
def test_every_expert_lives_somewhere_the_core_everywhere_and_overlap_with_three_nodes(n_experts: int, n_nodes: int, core: int) -> None:
    ranking = default_ranking(n_experts)[::-1]  # hottest last in file order: the core follows the ranking, not the ids
    nodes = [f"{i:064x}" for i in range(n_nodes)]
    out = assign_experts(ranking, nodes, core, n_used=1)
    assert not isinstance(out, NotShardable)
    assert set(out) == set(nodes)
    for experts in out.values():
        assert set(ranking[:core]) <= set(experts) and list(experts) == sorted(set(experts))
    for expert in ranking[core:]:
        holders = sum(expert in experts for experts in out.values())
        assert holders == min(overlap_for(n_nodes), n_nodes)
    assert set().union(*out.values()) == set(range(n_experts))


def test_every_node_computes_the_same_assignment_whatever_order_it_hears_of_the_others() -> None:
    nodes = ["c" * 64, "a" * 64, "b" * 64, "d" * 64]
    results = {tuple(sorted(assign_experts(default_ranking(16), list(p), 4, 2).items())) for p in itertools.permutations(nodes)}  # type: ignore[union-attr]
    assert len(results) == 1


def test_what_llama_cpp_would_refuse_is_not_shardable_with_the_reason() -> None:
    nodes = ["a" * 64, "b" * 64]
    assert assign_experts(default_ranking(8), nodes, core=1, n_used=2) == NotShardable("a core of 1 experts is fewer than the 2 the model uses per token")
    assert "once each" in assign_experts([0, 0, 1], nodes, 1, 1).reason  # type: ignore[union-attr]
    assert "distinct nodes" in assign_experts(default_ranking(4), ["a", "a"], 1, 1).reason  # type: ignore[union-attr]
    # 8 experts in 4 groups: a 2-node shard keeps 4 + 2 = 6, which 4 groups do not divide
    grouped = assign_experts(default_ranking(8), nodes, core=4, n_used=2, groups=4)
    assert isinstance(grouped, NotShardable) and "4 expert groups" in grouped.reason
    assert assign_experts(default_ranking(8), nodes, core=4, n_used=2, groups=2) == {nodes[0]: (0, 1, 2, 3, 4, 6), nodes[1]: (0, 1, 2, 3, 5, 7)}


# -- the plan: which nodes shard a model, and what each keeps ----------------------------

from mesh_llm.models.expert_rank import digest_of  # noqa: E402
from mesh_llm.plan.experts import ExpertFacts, plan_shards  # noqa: E402
from mesh_llm.plan.split import Candidate, Shards  # noqa: E402

GB = 10**9
A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def facts(ranking: tuple[int, ...] = tuple(range(8)), measured: bool = False) -> ExpertFacts:
    # 8 experts of 1 GB each over a 1 GB trunk; no KV: a shard of k experts needs 1.1 * (1 + k) GB
    return ExpertFacts(n_experts=8, n_used=2, groups=0, trunk_bytes=GB, expert_bytes=GB, kv_bytes=0,
                       ranking=ranking, measured=measured, core=4)


def node(id_: str, gb: float, ranking: tuple[int, ...] = (), fingerprint: str = "fp", shardable: bool = True) -> Candidate:
    return Candidate(id_, int(gb * GB), fingerprint, "e1", ranking=ranking, shardable=shardable)


NEED = int(1.1 * 9 * GB)  # the whole model


def test_three_nodes_none_of_which_holds_the_model_each_run_a_shard_with_the_hottest_experts_everywhere() -> None:
    hot = (7, 6, 5, 4, 3, 2, 1, 0)
    plan = plan_shards(node(B, 9, hot), [node(A, 9, hot), node(C, 9, hot)], model="m", need=NEED, facts=facts(hot, measured=True))
    assert isinstance(plan, Shards)
    assert plan.nodes == (A, B, C) and plan.me == B and plan.of == 8 and plan.ranking == digest_of(hot) and plan.excluded == ()
    for experts in plan.experts:
        assert {7, 6, 5, 4} <= set(experts)  # the core: the four hottest
    assert all(sum(e in experts for experts in plan.experts) == 2 for e in (3, 2, 1, 0))  # the rest twice (three nodes)
    assert plan.need == int(1.1 * (1 + len(plan.mine)) * GB)
    # every node works out the same plan
    others = [plan_shards(node(i, 9, hot), [node(j, 9, hot) for j in (A, B, C) if j != i], model="m", need=NEED, facts=facts(hot, measured=True))
              for i in (A, C)]
    assert all(isinstance(o, Shards) and o.experts == plan.experts for o in others)


def test_overlap_gives_way_when_shards_with_it_would_not_fit() -> None:
    # core 4 + 4 rest: with overlap 2 over 3 nodes a shard keeps 6 or 7 experts (8.8 GB); with overlap 1, 5 or 6 (7.7 GB)
    plan = plan_shards(node(A, 7.8), [node(B, 7.8), node(C, 7.8)], model="m", need=NEED, facts=facts())
    assert isinstance(plan, Shards)
    assert sorted(len(e) for e in plan.experts) == [5, 5, 6] and set().union(*plan.experts) == set(range(8))


def test_running_shards_that_still_hold_every_expert_are_kept_when_a_node_leaves_or_comes() -> None:
    start = plan_shards(node(A, 9), [node(B, 9), node(C, 9)], model="m", need=NEED, facts=facts())
    assert isinstance(start, Shards)
    running = dict(zip(start.nodes, start.experts, strict=True))
    # C is gone: A and B still hold everything between them, so neither changes (no restart)
    after = plan_shards(node(A, 9), [node(B, 9)], model="m", need=NEED, facts=facts(), running=running)
    assert isinstance(after, Shards) and after.experts == (running[A], running[B])
    # C comes back: A and B keep theirs, C gets a shard again
    back = plan_shards(node(C, 9), [node(A, 9), node(B, 9)], model="m", need=NEED, facts=facts(), running={A: running[A], B: running[B]})
    assert isinstance(back, Shards) and back.experts[:2] == (running[A], running[B]) and back.mine == running[C]
    # without the running shards of two nodes covering every expert, all are dealt afresh
    fresh = plan_shards(node(A, 9), [node(B, 9)], model="m", need=NEED, facts=facts(), running={A: running[A]})
    assert isinstance(fresh, Shards) and set(fresh.experts[0]) | set(fresh.experts[1]) == set(range(8)) and len(fresh.experts[0]) == 6


def test_what_cannot_be_sharded_says_why() -> None:
    alone = plan_shards(node(A, 8), [], model="m", need=NEED, facts=facts())
    assert isinstance(alone, NotShardable) and "two nodes" in alone.reason
    small = plan_shards(node(A, 3), [node(B, 8)], model="m", need=NEED, facts=facts())
    assert isinstance(small, NotShardable) and "holds no shard" in small.reason
    # a peer with a smaller memory is left out, the reason said; a peer that holds the whole model runs it whole
    plan = plan_shards(node(A, 8), [node(B, 8), node(C, 2), node(D, 12)], model="m", need=NEED, facts=facts())
    assert isinstance(plan, Shards) and plan.nodes == (A, B) and any(C[:8] in line for line in plan.excluded)
    other_file = plan_shards(node(A, 8), [node(B, 8, fingerprint="other"), node(C, 8)], model="m", need=NEED, facts=facts())
    assert isinstance(other_file, Shards) and other_file.nodes == (A, C) and "differs" in other_file.excluded[0]
    tight = plan_shards(node(A, 6.5), [node(B, 6.5)], model="m", need=NEED, facts=facts())  # 4 + 2 experts each: 7.7 GB
    assert isinstance(tight, NotShardable) and "needs 7.70 GB" in tight.reason


def test_every_node_deals_by_the_lowest_ids_measured_ranking_even_when_its_own_differs() -> None:
    theirs, mine = (7, 6, 5, 4, 3, 2, 1, 0), (6, 7, 5, 4, 3, 2, 1, 0)  # a near tie measured the other way round
    # B measured its own; A (the lowest id) measured another; C has none (no llama-imatrix): all deal by A's
    plans = [plan_shards(node(B, 9, mine), [node(A, 9, theirs), node(C, 9)], model="m", need=NEED, facts=facts(mine, measured=True)),
             plan_shards(node(A, 9, theirs), [node(B, 9, mine), node(C, 9)], model="m", need=NEED, facts=facts(theirs, measured=True)),
             plan_shards(node(C, 9), [node(A, 9, theirs), node(B, 9, mine)], model="m", need=NEED, facts=facts())]
    assert all(isinstance(p, Shards) for p in plans)
    assert {p.experts for p in plans if isinstance(p, Shards)} == {plans[1].experts}  # type: ignore[union-attr]
    assert {p.ranking for p in plans if isinstance(p, Shards)} == {digest_of(theirs)}
    assert all({7, 6, 5, 4} <= set(e) for e in plans[1].experts)  # type: ignore[union-attr]
    assert any("as aaaaaaaa measured them" in line for line in plans[0].excluded)  # type: ignore[union-attr]
    assert plans[1].excluded == ()  # type: ignore[union-attr]
    # nobody measured: the file's order, the same everywhere
    plain = plan_shards(node(A, 9), [node(B, 9)], model="m", need=NEED, facts=facts())
    assert isinstance(plain, Shards) and plain.ranking == digest_of(tuple(range(8)))


def test_a_new_ranking_leaves_running_shards_as_they_are() -> None:
    from mesh_llm.serving.lifecycle import plan_key

    hot, other = (7, 6, 5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, 5, 6, 7)
    start = plan_shards(node(B, 9, other), [node(A, 9, hot), node(C, 9, other)], model="m", need=NEED, facts=facts(other, measured=True))
    assert isinstance(start, Shards)
    running = dict(zip(start.nodes, start.experts, strict=True))
    # A (whose ranking the group dealt by) is gone: B and C still hold everything and deal by their own ranking now,
    # yet keep their experts, and their plans' keys do not change (no restart, no rebuild)
    after = plan_shards(node(B, 9, other), [node(C, 9, other)], model="m", need=NEED, facts=facts(other, measured=True), running=running)
    assert isinstance(after, Shards) and after.ranking != start.ranking and after.mine == start.mine
    assert plan_key(after) == plan_key(start)


def test_a_peer_that_takes_no_part_in_shards_is_not_dealt_experts() -> None:
    # C asked for layers (--split) or cannot cut the file: it says so, and nobody counts on it
    plan = plan_shards(node(A, 9), [node(B, 9), node(C, 9, shardable=False)], model="m", need=NEED, facts=facts())
    assert isinstance(plan, Shards) and plan.nodes == (A, B)


def test_a_shard_left_alone_serves_on_and_says_what_is_missing() -> None:
    start = plan_shards(node(A, 9), [node(B, 9)], model="m", need=NEED, facts=facts())
    assert isinstance(start, Shards)
    alone = plan_shards(node(A, 9), [], model="m", need=NEED, facts=facts(), running={A: start.mine})
    assert isinstance(alone, Shards) and alone.nodes == (A,) and alone.mine == start.mine
    assert any("2 of 8 experts are on no node" in line for line in alone.excluded)
    # a node that never had a shard does not start one alone
    assert isinstance(plan_shards(node(A, 9), [], model="m", need=NEED, facts=facts()), NotShardable)
