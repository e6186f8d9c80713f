"""Which experts of an MoE model each node keeps in its shard (pure; issue 17 step 2).

Every node keeps a core of the most used experts; the others are dealt out over the nodes,
each to one node, or to two when there are three nodes or more (so a lost node's experts
live on elsewhere). Nodes are taken in sorted id order, so every node computes the same
assignment from the same gossip. A shard must remain a model llama.cpp loads: at least as
many experts as are used per token, and, when the file groups its experts, a count the
groups divide. When that cannot hold, the model is not expert-shardable and the reason says
why (the planner then splits it by layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_EXPERTS = 512  # llama.cpp's limit on experts per model


@dataclass(frozen=True)
class NotShardable:
    reason: str


def core_size(n_experts: int, catalog_min: int | None = None) -> int:
    """Experts every node keeps: the catalog's tested minimum, else half of them (rounded up)."""
    return min(n_experts, catalog_min if catalog_min else math.ceil(n_experts / 2))


def default_ranking(n_experts: int) -> list[int]:
    """Hottest first, without routing statistics: the file's own order."""
    return list(range(n_experts))


def overlap_for(n_nodes: int) -> int:
    return 2 if n_nodes >= 3 else 1


def assign_experts(ranking: Sequence[int], nodes: Sequence[str], core: int, n_used: int,
                   groups: int = 0) -> dict[str, tuple[int, ...]] | NotShardable:
    """Each node's experts (sorted ids), or why the model cannot be sharded this way."""
    n_experts = len(ranking)
    if sorted(ranking) != list(range(n_experts)) or not 0 < n_experts <= MAX_EXPERTS:
        return NotShardable(f"the expert ranking must order experts 0..{n_experts - 1} once each")
    if not nodes or len(set(nodes)) != len(nodes):
        return NotShardable("expert shards need distinct nodes")
    if core < n_used:
        return NotShardable(f"a core of {core} experts is fewer than the {n_used} the model uses per token")
    order = sorted(nodes)
    kept: dict[str, set[int]] = {node: set(ranking[:core]) for node in order}
    copies = min(overlap_for(len(order)), len(order))
    for i, expert in enumerate(ranking[core:]):
        for j in range(copies):
            kept[order[(i + j) % len(order)]].add(expert)
    out = {node: tuple(sorted(experts)) for node, experts in kept.items()}
    if groups:
        odd = [node for node, experts in out.items() if len(experts) % groups or len(experts) <= groups]
        if odd:
            return NotShardable(f"{len(out[odd[0]])} experts on {odd[0][:8]} do not divide into the file's {groups} expert groups")
    return out
