"""Which of its models this node runs, and how, within one memory budget (pure).

The models a node was asked to serve are placed in the order they were asked
for: each may use what the earlier ones and the node's loans to other hosts'
splits leave of the offer. A model that fits there runs solo; one that does not
is planned over the mesh exactly as a single model is (split, standby or
waiting), with every peer's memory counted the same way from gossip. A newer
model never pushes out an older one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from mesh_llm.mesh.peers import PeerRecord, order_of
from mesh_llm.plan.budget import Ledger, memory_for
from mesh_llm.plan.experts import ExpertFacts, plan_shards
from mesh_llm.plan.split import Candidate, Plan, Shards, Solo, Split, Waiting, plan_model


@dataclass(frozen=True)
class Wanted:
    """A model this node was asked to serve, with what planning needs to know of it."""

    model: str
    need: int  # weights with headroom plus KV cache
    n_layers: int
    fingerprint: str
    draft_need: int = 0  # the draft runs on the host, next to the model
    force_split: bool = False
    manual_split: tuple[float, ...] | None = None
    keep: tuple[str, ...] = ()  # workers of its running split: kept while eligible
    keep_weights: tuple[float, ...] = ()  # and its shares: kept while the group holds them
    experts: ExpertFacts | None = None  # a mixture of experts: what sharding it by experts needs
    running_shards: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # node -> experts its shard runs now


@dataclass(frozen=True)
class Unplannable:
    """No plan can be made as asked (a --tensor-split that does not fit the group)."""

    reason: str


@dataclass(frozen=True)
class Placement:
    plans: dict[str, Plan | Unplannable]  # model -> this node's plan for it
    here: dict[str, int]  # model -> bytes the plan puts on this node
    free: int  # what is left of the offer


def share_here(plan: Plan | Unplannable, want: Wanted) -> int:
    """Bytes `plan` puts on this node: all of it solo, its shard, the host's share of a split, else none."""
    if isinstance(plan, Solo):
        return want.need + want.draft_need
    if isinstance(plan, Shards):
        return plan.need  # a shard runs without the draft
    if isinstance(plan, Split):
        total = sum(plan.weights) or 1.0
        return round(want.need * plan.weights[-1] / total) + want.draft_need
    return 0


def place(me: str, offer: int, engine: str, wanted: Sequence[Wanted], lent: Mapping[str, int],
          peers: Mapping[str, Sequence[Candidate]]) -> Placement:
    """Plan every wanted model in order.

    `lent`: per model, what other hosts' splits hold on this node (from their records);
    `peers`: per model, the other nodes that could take part, their memory already
    counted as what their other models leave (`budget.memory_for`)."""
    plans: dict[str, Plan | Unplannable] = {}
    here: dict[str, int] = {}
    placed = 0
    for want in wanted:
        loans = sum(amount for model, amount in lent.items() if model != want.model)
        room = max(0, offer - loans - placed)  # what peers see in gossip as this node's memory for it
        plan: Plan | Unplannable = _plan_one(me, room, engine, want, peers.get(want.model, ()))
        plans[want.model] = plan
        here[want.model] = share_here(plan, want) if not isinstance(plan, Unplannable) else 0
        placed += here[want.model]
    free = max(0, offer - sum(lent.values()) - placed)
    return Placement(plans, here, free)


def _plan_one(me: str, room: int, engine: str, want: Wanted, peers: Sequence[Candidate]) -> Plan | Unplannable:
    """Solo when it fits; an MoE model that does not is sharded by experts when it can be
    (else split by layers, with the reason among the plan's lines); a dense one is split."""
    facts = want.experts
    mine = Candidate(me, room, want.fingerprint, engine, ranking=facts.ranking if facts and facts.measured else (), shardable=facts is not None)
    why_not_shards = ""
    if facts is not None and room - want.draft_need < want.need:  # (facts: None when --split or --tensor-split asks for layers)
        # every node counts the same memory for everyone (a shard runs without a draft), so all deal alike
        sharded = plan_shards(mine, peers, model=want.model, need=want.need, facts=facts, running=want.running_shards)
        if isinstance(sharded, Shards):
            return sharded
        why_not_shards = sharded.reason
    try:
        plan = plan_model(mine, peers, model=want.model, need=want.need, n_layers=want.n_layers, force_split=want.force_split,
                          manual_split=want.manual_split, keep=want.keep, keep_weights=want.keep_weights, reserve=want.draft_need)
    except ValueError as exc:
        return Unplannable(str(exc))
    if why_not_shards and isinstance(plan, Split):
        plan = replace(plan, excluded=(*plan.excluded, f"{want.model} is split by layers, not by experts: {why_not_shards}"))
    elif why_not_shards and isinstance(plan, Waiting):
        plan = replace(plan, excluded=(*plan.excluded, f"{want.model} is not sharded by experts yet: {why_not_shards}"))
    return plan


def peer_candidates(model: str, peers: Sequence[tuple[PeerRecord, float | None]], held: Ledger) -> list[Candidate]:
    """The other nodes that could take part in `model` (record, RTT): they have it on disk and
    an engine, and their memory for it is what their other models leave."""
    out = []
    for r, rtt in peers:
        if r.role == "client" or model not in r.models_on_disk or not r.engine_version:
            continue
        i = r.models_on_disk.index(model)
        fp = r.fingerprints[i] if i < len(r.fingerprints) else ""
        shard_word = r.rankings[i] if i < len(r.rankings) else ""
        ranking = order_of(shard_word) if shard_word not in ("", "s") else ()
        out.append(Candidate(r.id, memory_for(r.vram_bytes, held, r.id, model), fp, r.engine_version, rtt, ranking, bool(shard_word)))
    return out
