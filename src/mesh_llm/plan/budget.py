"""Who holds how much memory for which model, read from gossip (pure).

Every host says what it runs and how each split is shared, so every node can
work out the same ledger: a model running whole holds its need on its host; a
split holds its need on each node in proportion to that node's share. Models
waiting for peers hold nothing. A node's memory for one model is its offer
minus what its *other* models hold, so a split never competes with itself.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from mesh_llm.mesh.peers import PeerRecord

Ledger = dict[str, dict[str, int]]  # node id -> model -> bytes held there


def ledger(records: Iterable[PeerRecord], hosts: Container[str] | None = None) -> Ledger:
    """Bytes every node holds for every model, from the hosts' own records (only the records of
    `hosts`, when given: e.g. what *other* nodes' splits put on this one)."""
    records = list(records)
    holders = {r.id for r in records if r.role != "client"}  # a host may name anyone: credit members only
    held: Ledger = {}

    def add(node: str, model: str, amount: int) -> None:
        per_model = held.setdefault(node, {})
        per_model[model] = per_model.get(model, 0) + amount

    for r in records:
        if r.id not in holders or (hosts is not None and r.id not in hosts):
            continue
        for h in r.hosting:
            if not h.holds_memory:
                continue
            total = sum(s.share for s in h.split)
            if not h.split or total <= 0:
                add(r.id, h.name, h.need_bytes + h.draft_bytes)
                continue
            for s in h.split:
                if s.node in holders:
                    add(s.node, h.name, round(h.need_bytes * s.share / total) + (h.draft_bytes if s.node == r.id else 0))
    return held


def used_bytes(held: Ledger, node: str) -> int:
    return sum(held.get(node, {}).values())


def memory_for(offer: int, held: Ledger, node: str, model: str) -> int:
    """What `node` can give `model`: its offer less what its other models hold (never below 0)."""
    others = sum(amount for name, amount in held.get(node, {}).items() if name != model)
    return max(0, offer - others)
