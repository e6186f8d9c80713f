"""The status document behind /api/status, /api/events and the console (pure).

Everything in it comes from gossip (every node's record, including what each
host says about its models and their split) plus this node's own view: RTTs,
last-seen times, its token and its ports. So every member, clients included,
shows the same mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_llm.api.agents import agent_commands
from mesh_llm.mesh.peers import HostedModel, PeerRecord
from mesh_llm.plan.budget import ledger, used_bytes

ROLE_ORDER = {"host": 0, "worker": 1, "standby": 2, "client": 3}
VOLATILE = ("rtt_ms", "last_seen_secs")  # change every heartbeat: not a change worth an event


@dataclass(frozen=True)
class PeerView:
    record: PeerRecord
    rtt_ms: float | None = None
    last_seen_secs: float = 0.0


@dataclass(frozen=True)
class Ports:
    api: int
    console: int | None = None
    listen_all: bool = False


def memory_used(records: list[PeerRecord]) -> dict[str, int]:
    """Bytes each node holds for models, from the hosts' plans: a split's need shared by weight."""
    held = ledger(records)
    return {node: used_bytes(held, node) for node in held}


def _model_entry(host: PeerRecord, h: HostedModel, names: dict[str, str], ports: Ports) -> dict[str, Any]:
    total = sum(s.share for s in h.split) or 1.0
    return {
        "name": h.name,
        "host": host.id,
        "host_name": names.get(host.id, host.id[:8]),
        "state": h.state,
        "ready": h.state == "ready",
        "detail": h.detail,
        "size_bytes": h.size_bytes,
        "need_bytes": h.need_bytes,
        "ctx": h.ctx,
        "draft": h.draft or None,
        "aliases": list(h.aliases),
        "tools": h.tools,
        "moe": {"experts": h.experts, "experts_used": h.experts_used, **({"groups": h.expert_groups} if h.expert_groups else {}),
                "shard": list(h.shard_experts) or None} if h.experts else None,  # shard: the experts this host's shard keeps
        "split": [
            {"node": s.node, "node_name": names.get(s.node, s.node[:8]), "weight": s.share, "share": s.share / total,
             "first": s.first, "last": s.last, "output": s.output}
            for s in h.split
        ],
        "commands": agent_commands(h.name, ports.api, h.ctx),
    }


def _node_entry(view: PeerView, is_self: bool, used: dict[str, int]) -> dict[str, Any]:
    r = view.record
    return {
        "id": r.id,
        "name": r.hostname or r.id[:8],
        "self": is_self,
        "role": r.role,
        "version": r.version,
        "engine": r.engine_version,
        "device": ", ".join(r.devices),
        "memory_bytes": r.vram_bytes,
        "used_bytes": used.get(r.id, 0),
        "free_bytes": r.free_bytes,
        "lending": list(r.lending),
        "rtt_ms": None if view.rtt_ms is None else round(view.rtt_ms, 2),
        "last_seen_secs": round(view.last_seen_secs, 1),
        "models_on_disk": list(r.models_on_disk),
        "models_served": list(r.models_served),
        "on_demand": [o.name for o in r.on_demand],
        "api_port": r.api_port,
        "addrs": list(r.addrs),
    }


def status_document(me: PeerRecord, peers: list[PeerView], *, mesh_id: str, token: str | None, ports: Ports, client_token: str | None = None,
                    routes: list[str], local: list[dict[str, Any]] | None = None, servers: dict[str, list[str]] | None = None,
                    demand: dict[str, Any] | None = None, discovery: dict[str, Any] | None = None) -> dict[str, Any]:
    """This node, its token, every node with its memory and share, every model the mesh runs.

    `routes` are the models this node's API answers for now (`servers`: for each, the nodes
    ready to answer it, "local" for this one); `local` is one entry per
    model this node serves (its own view: plan, split with RPC traffic, port, requests).
    """
    records = [me] + [p.record for p in peers]
    used = memory_used(records)
    others = sorted(peers, key=lambda p: (ROLE_ORDER.get(p.record.role, 9), p.record.hostname, p.record.id))
    nodes = [_node_entry(PeerView(me), True, used)] + [_node_entry(p, False, used) for p in others]
    names = {n["id"]: n["name"] for n in nodes}
    models = [_model_entry(r, h, names, ports) for r in records for h in r.hosting]
    models.sort(key=lambda m: (m["name"], m["host"]))
    return {
        "node": nodes[0],
        "token": token,
        "client_token": client_token,
        "mesh": {
            "id": mesh_id,
            "node_count": len(nodes),
            "total_memory_bytes": sum(r.vram_bytes for r in records if r.role != "client"),
        },
        "api": {"port": ports.api, "url": f"http://localhost:{ports.api}/v1", "listen_all": ports.listen_all, "models": routes,
                "servers": servers or {}},
        "console": {"port": ports.console},
        "nodes": nodes,
        "models": models,
        "serving": local or [],
        "demand": demand or {"models": [], "decisions": [], "on_demand": [], "promoted": []},
        # how strangers find this mesh: the LAN announcement and the public listing (Publisher.state), if any
        "discovery": discovery or {"mesh_name": None, "lan_announced": False, "listing": None},
    }


def stable_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without the figures that drift all the time (RTT, last seen, RPC counters)."""
    out = dict(doc)
    out["nodes"] = [{k: v for k, v in n.items() if k not in VOLATILE} for n in doc.get("nodes", [])]
    out["node"] = {k: v for k, v in doc.get("node", {}).items() if k not in VOLATILE}
    if isinstance((doc.get("discovery") or {}).get("listing"), dict):  # republishing every minute changes nothing a viewer sees
        listing = {k: v for k, v in doc["discovery"]["listing"].items() if k not in ("last_published_at", "publishes")}
        out["discovery"] = {**doc["discovery"], "listing": listing}
    if isinstance(doc.get("serving"), list):  # RPC counters and request counts tick with every token
        out["serving"] = [{k: v for k, v in m.items() if k not in ("rpc_traffic", "requests", "in_flight")} for m in doc["serving"]]
    return out
