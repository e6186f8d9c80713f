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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh_llm.models.expert_rank import digest_of
from mesh_llm.plan.split import Candidate, Shards, required_bytes

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
                   groups: int = 0, overlap: int | None = None) -> dict[str, tuple[int, ...]] | NotShardable:
    """Each node's experts (sorted ids), or why the model cannot be sharded this way.
    `overlap`: on how many nodes each non-core expert lives (default: `overlap_for`)."""
    n_experts = len(ranking)
    if sorted(ranking) != list(range(n_experts)) or not 0 < n_experts <= MAX_EXPERTS:
        return NotShardable(f"the expert ranking must order experts 0..{n_experts - 1} once each")
    if not nodes or len(set(nodes)) != len(nodes):
        return NotShardable("expert shards need distinct nodes")
    if core < n_used:
        return NotShardable(f"a core of {core} experts is fewer than the {n_used} the model uses per token")
    order = sorted(nodes)
    kept: dict[str, set[int]] = {node: set(ranking[:core]) for node in order}
    copies = max(1, min(overlap or overlap_for(len(order)), len(order)))
    for i, expert in enumerate(ranking[core:]):
        for j in range(copies):
            kept[order[(i + j) % len(order)]].add(expert)
    out = {node: tuple(sorted(experts)) for node, experts in kept.items()}
    if groups:
        odd = [node for node, experts in out.items() if len(experts) % groups or len(experts) <= groups]
        if odd:
            return NotShardable(f"{len(out[odd[0]])} experts on {odd[0][:8]} do not divide into the file's {groups} expert groups")
    return out


@dataclass(frozen=True)
class ExpertFacts:
    """What planning knows of an MoE model's file and this node's ranking of its experts."""

    n_experts: int
    n_used: int  # experts each token runs through
    groups: int  # expert groups in the file (0: none)
    trunk_bytes: int  # every tensor that is not a routed expert
    expert_bytes: int  # one expert over all layers, its router rows included
    kv_bytes: int
    ranking: tuple[int, ...]  # this node's, hottest first (measured, else the file's order)
    measured: bool  # from routing statistics (peers may adopt it), not just the file's order
    core: int  # experts every shard keeps

    def need(self, n_keep: int) -> int:
        """What a shard keeping `n_keep` experts takes to run."""
        return required_bytes(self.trunk_bytes + n_keep * self.expert_bytes, self.kv_bytes)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def plan_shards(me: Candidate, peers: Sequence[Candidate], *, model: str, need: int, facts: ExpertFacts,
                running: Mapping[str, Sequence[int]] = {}) -> Shards | NotShardable:
    """Shard `model` by experts over this node and the peers that want it and cannot hold it
    whole (those run it whole). The experts are ranked by the measured ranking of the group's
    lowest id that has one (so every node deals the same experts, even when their own
    measurements differ in a near tie), else in the file's order. `running`: the experts each
    node's shard runs now (from gossip): while the running shards of the group's nodes still
    hold every expert, they are kept as they are (a lost node's experts live on elsewhere) and
    only nodes without one get a new shard, so a node coming or going restarts no shard that
    did not change."""
    group = [me] + [p for p in peers if p.shardable and p.memory < need]
    smallest = facts.need(facts.core)
    members: list[Candidate] = []
    excluded: list[str] = []
    for c in group:
        if c is not me and c.fingerprint != me.fingerprint:
            excluded.append(f"{c.id[:8]} left out of the expert shards: its copy of {model} differs from this node's")
        elif c.memory < smallest:
            if c is me:
                return NotShardable(f"this node's {_gb(c.memory)} holds no shard (the smallest, {facts.core} of {facts.n_experts} experts, needs {_gb(smallest)})")
            excluded.append(f"{c.id[:8]} left out of the expert shards: its {_gb(c.memory)} holds no shard (the smallest needs {_gb(smallest)})")
        else:
            members.append(c)
    measured = sorted((c for c in members if len(c.ranking) == facts.n_experts), key=lambda c: c.id)
    ranking = measured[0].ranking if measured else facts.ranking
    if facts.measured and ranking != facts.ranking:
        excluded.append(f"{model}: the experts are ranked as {measured[0].id[:8]} measured them (this node's measurement differs)")
    everything = set(range(facts.n_experts))
    mine_now = set(running.get(me.id, ()))
    if len(members) < 2:
        if mine_now and facts.n_used <= len(mine_now) and mine_now <= everything and facts.need(len(mine_now)) <= me.memory:
            # the others are gone: its shard serves on alone rather than not at all
            missing = len(everything - mine_now)
            excluded.append(f"{model}: serving its shard alone; {missing} of {facts.n_experts} experts are on no node until another node joins")
            kept_alone = tuple(sorted(mine_now))
            return Shards(me.id, (me.id,), (kept_alone,), facts.n_experts, digest_of(ranking), facts.need(len(kept_alone)), tuple(excluded))
        return NotShardable(f"expert shards need two nodes that can each hold {_gb(smallest)} ({len(members)} so far)")
    nodes = sorted(c.id for c in members)
    memory = {c.id: c.memory for c in members}
    kept = {n: tuple(sorted(set(running[n]))) for n in nodes
            if n in running and facts.n_used <= len(set(running[n])) and set(running[n]) <= everything and facts.need(len(set(running[n]))) <= memory[n]}
    covered = bool(kept) and set().union(*kept.values()) == everything
    tried: dict[str, tuple[int, ...]] = {}
    for overlap in dict.fromkeys((overlap_for(len(nodes)), 1)):  # overlap where it fits, else each expert once
        fresh = assign_experts(ranking, nodes, facts.core, facts.n_used, facts.groups, overlap)
        if isinstance(fresh, NotShardable):
            return fresh
        tried = {**fresh, **kept} if covered else fresh
        if all(facts.need(len(tried[n])) <= memory[n] for n in nodes):
            return Shards(me.id, tuple(nodes), tuple(tried[n] for n in nodes), facts.n_experts, digest_of(ranking),
                          facts.need(len(tried[me.id])), tuple(excluded))
    short = next(n for n in nodes if facts.need(len(tried[n])) > memory[n])
    return NotShardable(f"a shard of {len(tried[short])} of {facts.n_experts} experts needs {_gb(facts.need(len(tried[short])))}; "
                        f"{short[:8]} has {_gb(memory[short])} for it")
