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
