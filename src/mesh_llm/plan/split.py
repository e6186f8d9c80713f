"""Election and layer split for one model (pure: plain data in, a plan out).

Every node that wants a model and cannot hold it alone takes part. The one
with the most memory (ties: the greater id) hosts: it runs llama-server and
adds workers, nearest first, until the group holds the model. Layers are
shared in proportion to memory, with the host's own device last so the final
layers and the output head (the logits) stay on the host. Every node computes
the same election from the same gossip, so nobody has to announce it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HEADROOM = 1.1  # weights plus compute buffers: about 10 % over the file size
MAX_SPLIT_RTT_MS = 80.0  # farther workers cost more per token than they give
MIB = 1 << 20


@dataclass(frozen=True)
class Candidate:
    """A node that wants the model, as the deciding node sees it."""

    id: str
    memory: int  # bytes it offers
    fingerprint: str  # of its GGUF copy: workers must hold the very same file
    engine: str  # engine version: the RPC protocol must match
    rtt_ms: float | None = None  # from the deciding node; None for itself or not yet measured
    ranking: tuple[int, ...] = ()  # MoE: the expert order it measured (hottest first; () none)
    shardable: bool = False  # MoE: it would take part in expert shards of the model (says so in gossip)


@dataclass(frozen=True)
class LayerRange:
    node: str
    first: int  # inclusive; first > last means no repeating layers
    last: int
    output: bool  # holds the output head (and so computes the logits)

    def __str__(self) -> str:
        layers = f"layers {self.first}–{self.last}" if self.first <= self.last else "no layers"
        return layers + (" + output" if self.output else "")


@dataclass(frozen=True)
class Solo:
    """The model fits here: run it alone."""


@dataclass(frozen=True)
class Standby:
    """Another node hosts the split; this one lends its worker if asked."""

    host: str
    note: str = ""  # why it will not be used, when that is known


@dataclass(frozen=True)
class Split:
    host: str
    workers: tuple[str, ...]  # in llama.cpp device order (--rpc order); the host comes last
    weights: tuple[float, ...]  # --tensor-split: one per worker, then the host
    layers: tuple[LayerRange, ...]  # predicted placement, same order as weights
    excluded: tuple[str, ...] = ()  # one line per peer left out, with the reason
    spares: tuple[str, ...] = ()  # eligible peers the group does not need (a worker lost is replaced from here)


@dataclass(frozen=True)
class Waiting:
    need: int
    have: int
    excluded: tuple[str, ...] = ()

    def message(self) -> str:
        return f"Waiting for more peers — need {self.need / 1e9:.2f} GB, have {self.have / 1e9:.2f} GB"


@dataclass(frozen=True)
class Shards:
    """An MoE model no node holds alone: each node of the group runs its own shard of it (the
    trunk and some of the experts) with its own llama-server, and nothing crosses the network."""

    me: str
    nodes: tuple[str, ...]  # the group, in sorted id order
    experts: tuple[tuple[int, ...], ...]  # each node's experts, same order
    of: int  # experts in the whole model
    ranking: str  # digest of the expert ranking the core was taken from
    need: int  # what this node's shard takes: weights with headroom and KV cache
    excluded: tuple[str, ...] = ()

    @property
    def mine(self) -> tuple[int, ...]:
        return self.experts[self.nodes.index(self.me)]


Plan = Solo | Standby | Split | Waiting | Shards


def required_bytes(model_bytes: int, kv_bytes: int) -> int:
    return int(HEADROOM * model_bytes) + kv_bytes


def kv_cache_bytes(n_layers: int, ctx: int, n_head: int, n_head_kv: int | list[int], n_embd: int, key_length: int | None = None, value_length: int | None = None, bytes_per_value: int = 2) -> int:
    """f16 K and V for every layer and position (per-layer KV head counts allowed)."""
    head_dim = n_embd // max(1, n_head)
    k = key_length or head_dim
    v = value_length or head_dim
    heads = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layers
    return sum(ctx * h * (k + v) * bytes_per_value for h in heads[:n_layers])


def elect_host(group: Sequence[Candidate]) -> Candidate:
    """Most memory wins; equal memory: the greater id (same rule on every node)."""
    return max(group, key=lambda c: (c.memory, c.id))


def exclusion(me: Candidate, peer: Candidate, model: str) -> str | None:
    """Why `peer` cannot be one of my workers, or None."""
    if peer.fingerprint != me.fingerprint:
        return f"{peer.id[:8]} left out: its copy of {model} differs from the host's (fingerprint {peer.fingerprint[:12]} vs {me.fingerprint[:12]})"
    if peer.engine != me.engine:
        return f"{peer.id[:8]} left out: its engine {peer.engine or 'unknown'} differs from the host's {me.engine}"
    if peer.rtt_ms is not None and peer.rtt_ms > MAX_SPLIT_RTT_MS:
        return f"{peer.id[:8]} left out: {peer.rtt_ms:.0f} ms away (limit {MAX_SPLIT_RTT_MS:.0f} ms)"
    return None


def plan_model(
    me: Candidate,
    peers: Sequence[Candidate],
    *,
    model: str,
    need: int,
    n_layers: int,
    force_split: bool = False,
    manual_split: Sequence[float] | None = None,
    keep: Sequence[str] = (),
    keep_weights: Sequence[float] = (),
    reserve: int = 0,
) -> Plan:
    """This node's part for `model`. `peers`: other non-client nodes that want it.
    `keep`, `keep_weights`: the workers and shares of the running split; the workers are
    preferred while still eligible and the shares kept while the group still holds them,
    so a newcomer, a shift in RTT or another model's memory does not restart a working split.
    `reserve`: what this node keeps beside its share when it runs the model (its draft). The
    election uses the memory every node can see in gossip, so every node elects the same host."""
    if not force_split and me.memory - reserve >= need:
        return Solo()
    group = [me] + [p for p in peers if force_split or p.memory < need]
    host = elect_host(group)
    if host.id != me.id:
        note = ""
        if host.fingerprint != me.fingerprint:
            note = f"my copy of {model} differs from host {host.id[:8]}'s, so it will not use this node"
        elif host.engine != me.engine:
            note = f"my engine {me.engine} differs from host {host.id[:8]}'s {host.engine}, so it will not use this node"
        return Standby(host.id, note)

    excluded: list[str] = []
    eligible: list[Candidate] = []
    for peer in group[1:]:
        reason = exclusion(me, peer, model)
        if reason:
            excluded.append(reason)
        else:
            eligible.append(peer)
    # the running split's workers first and in their order (RTT jitter must not reorder them: that
    # would restart llama-server), then the others nearest first
    rank = {node: i for i, node in enumerate(keep)}
    eligible.sort(key=lambda p: (rank.get(p.id, len(rank)), p.rtt_ms is None, p.rtt_ms or 0.0, p.id))
    chosen: list[Candidate] = []
    own = max(0, me.memory - reserve)  # what this node holds of the model itself, as its host
    total = own
    for peer in eligible:
        if total >= need and (chosen or not force_split):
            break
        chosen.append(peer)
        total += peer.memory
    if total < need or (force_split and not chosen):
        return Waiting(need, own + sum(p.memory for p in eligible), tuple(excluded))

    order = chosen + [me]  # llama.cpp puts RPC devices first; the host's device last
    capacity = [c.memory for c in chosen] + [own]
    if manual_split is not None:
        if len(manual_split) != len(order) or any(w < 0 for w in manual_split) or not any(w > 0 for w in manual_split):
            raise ValueError(f"--tensor-split needs {len(order)} non-negative values (workers nearest first, then this host), got {list(manual_split)}")
        weights = tuple(float(w) for w in manual_split)
    elif tuple(c.id for c in chosen) == tuple(keep) and shares_fit(keep_weights, capacity, need):
        weights = tuple(keep_weights)
    else:
        weights = tuple(float(max(1, m // MIB)) for m in capacity)
    weights = tuple(float(format(w, "g")) for w in weights)  # exactly what llama.cpp will parse
    layers = predict_layers([c.id for c in order], weights, n_layers)
    spares = tuple(p.id for p in eligible if p not in chosen)
    return Split(me.id, tuple(c.id for c in chosen), weights, layers, tuple(excluded), spares)


def shares_fit(weights: Sequence[float], capacity: Sequence[int], need: int) -> bool:
    """Does every node of a group hold its share of `need` under these weights?"""
    total = sum(weights)
    return len(weights) == len(capacity) and total > 0 and all(need * w / total <= c for w, c in zip(weights, capacity, strict=True))


def predict_layers(nodes: Sequence[str], weights: Sequence[float], n_layers: int) -> tuple[LayerRange, ...]:
    """Where llama.cpp puts each layer for `-ngl all -ts weights` (llama-model.cpp,
    load_tensors): cumulative shares in float32, layer i goes to the first device whose
    share exceeds i / (n_layers + 1); the output head is "layer" n_layers."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float32), dtype=np.float32)
    cum = cum / cum[-1]
    act = n_layers + 1

    def device_of(il: int) -> int:
        return int(np.searchsorted(cum, np.float32(il) / np.float32(act), side="right"))

    owner = [device_of(il) for il in range(n_layers)]
    out_dev = device_of(n_layers)
    ranges = []
    for d, node in enumerate(nodes):
        mine = [il for il, o in enumerate(owner) if o == d]
        first, last = (mine[0], mine[-1]) if mine else (0, -1)
        ranges.append(LayerRange(node, first, last, d == out_dev))
    return tuple(ranges)


def format_tensor_split(weights: Sequence[float]) -> str:
    return ",".join(f"{w:g}" for w in weights)
