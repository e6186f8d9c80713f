"""Peer records and membership rules (pure: no sockets, no clocks of its own).

A member is a peer this node holds an admitted connection to; the mesh is a
full mesh, so gossip is only needed to *discover* whom to dial. Each gossip
frame carries the sender's own record plus the dial addresses of its members.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from mesh_llm.mesh.wire import MAX_FRAME, ProtocolError, get_bool, get_float, get_hex, get_int, get_list, get_str, get_str_list
from mesh_llm.text import is_name, printable

HEARTBEAT_SECS = 0.5  # gossip with every member this often
DEAD_AFTER_SECS = 1.5  # a member silent this long (three heartbeats missed) is dropped: at most ~2 s after it died
# A member whose QUIC stack still acknowledges our packets is alive even when its node is too
# starved to gossip in time (a loaded 2-core machine); only this much gossip silence drops it then.
HUNG_AFTER_SECS = 10.0
REDIAL_BACKOFF_SECS = 5.0  # don't re-dial a peer that just failed more often than this
MAX_PEERS_PER_FRAME = 256
MAX_MEMBERS = 256  # other serving nodes one node admits; past this, admission is refused with a reason
MAX_CLIENTS = 256  # clients, counted apart: a client-token holder with many identities cannot crowd members out
GOSSIP_BUDGET = MAX_FRAME - 4096  # encoded bytes of one gossip frame, with headroom for framing

# What a peer may say about itself: ASCII addresses, printable names, all of bounded length,
# so that no record (and no hint passed on for it) can bloat other nodes' frames or terminals.
MAX_DIAL_ADDRS = 8
MAX_ADDR_LEN = 128  # "[v6%scope]:port" or a hostname with its port
MAX_RELAY_LEN = 256
MAX_HOSTNAME_LEN = 255
MAX_NAME_LEN = 256  # model names and aliases
MAX_VERSION_LEN = 64
MAX_DEVICES = 16
MAX_DEVICE_LEN = 128

# Dials of ids learned from gossip (not from the user's tokens): a peer's hints must not make
# this node dial arbitrary addresses en masse.
HINTED_DIALS_AT_ONCE = 4
HINTED_DIALS_PER_SEC = 2.0
HINTED_DIAL_BURST = 4

ROLES = ("host", "worker", "client", "standby")
MODEL_STATES = ("ready", "loading", "planning", "waiting", "error", "unloading")  # what we send; newer peers may add more
HOLDING_STATES = ("ready", "loading", "unloading")  # a model in these holds its memory
MAX_HOSTED = 8  # models one node runs llama-server for
MAX_SLICES = 32  # nodes in one split
MAX_ALIASES = 4  # names a model answers to besides its id
MAX_ALIAS_LEN = 256
MAX_DETAIL = 512
MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS: llama.cpp loads no model with more
MAX_MODELS_ON_DISK = 64
MAX_DEMAND = 32  # models one node reports requests for (callers pick the names: kept small)
MAX_ON_DEMAND = 16  # model files one node could serve on demand
MAX_REQUESTS = 1 << 31  # requests one node reports for one model in a window
MAX_UNIX_TIME = 1e11  # a last-active time past this (year 5138) is not a time


def get_role(doc: dict[str, Any]) -> str:
    role = get_str(doc, "role", 16, "standby")
    if role not in ROLES:
        raise ProtocolError(f"unknown role {role!r}")
    return role


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_dial_addr(text: str) -> bool:
    """`host:port` with an IPv4 address, a bracketed IPv6 address or a DNS name; port 1-65535."""
    if not text.isascii() or len(text) > MAX_ADDR_LEN:
        return False
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if host.replace(".", "").isdigit():  # looks like IPv4: must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def is_relay_url(text: str) -> bool:
    """Empty (no relay) or an http(s) URL of printable ASCII."""
    if not text:
        return True
    if len(text) > MAX_RELAY_LEN or not text.isascii() or not all("!" <= ch <= "~" for ch in text):
        return False
    try:
        url = urlsplit(text)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


def get_addrs(doc: dict[str, Any]) -> tuple[str, ...]:
    addrs = get_str_list(doc, "addrs", MAX_DIAL_ADDRS, MAX_ADDR_LEN)
    for a in addrs:
        if not is_dial_addr(a):
            raise ProtocolError(f"field 'addrs' holds {a[:80]!r}, which is not an ASCII host:port")
    return tuple(addrs)


def get_relay(doc: dict[str, Any]) -> str:
    relay = get_str(doc, "relay", MAX_RELAY_LEN, "")
    if not is_relay_url(relay):
        raise ProtocolError(f"field 'relay' must be an http(s) URL of at most {MAX_RELAY_LEN} ASCII characters")
    return relay


def get_name(doc: dict[str, Any], name: str, max_len: int, default: str | None = "") -> str:
    """A string shown to people (hostname, version, model): printable text, or empty."""
    value = get_str(doc, name, max_len, default)
    if value and not is_name(value, max_len):
        raise ProtocolError(f"field {name!r} must be printable text without control characters")
    return value


def get_names(doc: dict[str, Any], name: str, max_items: int, max_len: int, allow_empty: bool = False) -> tuple[str, ...]:
    values = get_str_list(doc, name, max_items, max_len)
    if not all(is_name(v, max_len) or (allow_empty and not v) for v in values):
        raise ProtocolError(f"field {name!r} must be a list of printable, non-empty names")
    return tuple(values)


def own_dial_addrs(addrs: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """What this node advertises: the addresses peers will accept, IPv4 first, at most MAX_DIAL_ADDRS."""
    valid = [a for a in addrs if is_dial_addr(a)]
    return tuple(sorted(valid, key=lambda a: a.startswith("["))[:MAX_DIAL_ADDRS])


@dataclass(frozen=True)
class Slice:
    """One node's part of a split model, as the host planned it."""

    node: str  # endpoint id, 64 hex chars
    share: float  # its --tensor-split weight
    first: int  # first repeating layer; first > last: none
    last: int
    output: bool  # holds the output head

    @staticmethod
    def from_wire(doc: Any) -> Slice:
        if not isinstance(doc, dict):
            raise ProtocolError("split entry is not an object")
        return Slice(
            node=get_hex(doc, "node", 32).hex(),
            share=get_float(doc, "share", 0.0, 1e12),
            first=get_int(doc, "first", 0, 1 << 20),
            last=get_int(doc, "last", -1, 1 << 20),
            output=get_bool(doc, "output"),
        )


@dataclass(frozen=True)
class HostedModel:
    """A model this node runs llama-server for (alone or as a split's host)."""

    name: str
    state: str  # one of MODEL_STATES
    detail: str = ""  # what it waits for or why it failed, in words
    size_bytes: int = 0  # the GGUF file
    need_bytes: int = 0  # weights with headroom plus KV cache
    ctx: int = 0
    draft: str = ""
    draft_bytes: int = 0  # what the draft takes on the host, beside its share
    split: tuple[Slice, ...] = ()  # empty: the whole model on the host
    aliases: tuple[str, ...] = ()  # the names it was asked for by (e.g. `gemma-3-270m`): requests may use them
    experts: int = 0  # mixture of experts: experts per layer (0: dense), from the GGUF header
    experts_used: int = 0  # of those, how many each token runs through
    expert_groups: int = 0  # the experts come in this many groups (0: none)
    shard: str = ""  # expert-sharded: the experts this node's shard keeps, as a hex bit mask ("" the whole model)
    tools: bool = False  # its chat template renders tool definitions (agents that call tools pick such a model)

    @property
    def shard_experts(self) -> tuple[int, ...]:
        return experts_of_mask(self.shard)

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "split": [asdict(s) for s in self.split], "aliases": list(self.aliases)}

    @property
    def holds_memory(self) -> bool:
        return self.state in HOLDING_STATES

    @staticmethod
    def from_wire(doc: Any) -> HostedModel:
        if not isinstance(doc, dict):
            raise ProtocolError("hosted model is not an object")
        name = get_str(doc, "name", MAX_NAME_LEN)
        if not is_name(name, MAX_NAME_LEN):  # it ends up in copy-paste commands and on pages
            raise ProtocolError("hosted model name must be printable text")
        split = tuple(Slice.from_wire(s) for s in get_list(doc, "split", MAX_SLICES))
        if len({s.node for s in split}) != len(split):
            raise ProtocolError("a split names a node twice")
        # absent from peers that predate MoE detection: dense as far as anyone knows
        experts = get_int(doc, "experts", 0, MAX_EXPERTS, 0)
        return HostedModel(
            name=name,
            state=get_name(doc, "state", 16, None),
            detail=printable(get_str(doc, "detail", MAX_DETAIL, ""), MAX_DETAIL),  # free text (an error may span lines): cleaned, not refused
            size_bytes=get_int(doc, "size_bytes", 0, 2**62, 0),
            need_bytes=get_int(doc, "need_bytes", 0, 2**62, 0),
            ctx=get_int(doc, "ctx", 0, 1 << 24, 0),
            draft=get_name(doc, "draft", MAX_NAME_LEN),
            draft_bytes=get_int(doc, "draft_bytes", 0, 2**62, 0),
            split=split,
            aliases=tuple(a for a in get_str_list(doc, "aliases", MAX_ALIASES, MAX_ALIAS_LEN) if is_name(a, MAX_ALIAS_LEN)),
            experts=experts,
            experts_used=get_int(doc, "experts_used", 0, experts, 0),  # a token cannot run through experts the model lacks
            expert_groups=get_int(doc, "expert_groups", 0, experts, 0),
            shard=_shard_mask(get_str(doc, "shard", MAX_EXPERTS // 4, ""), experts),
            tools=get_bool(doc, "tools", False),  # absent from older peers: not known to
        )


def experts_mask(experts: Iterable[int]) -> str:
    """Expert ids as a hex bit mask (at most 128 characters for llama.cpp's 512 experts)."""
    bits = sum(1 << e for e in set(experts))
    return format(bits, "x") if bits else ""


def experts_of_mask(mask: str) -> tuple[int, ...]:
    bits = int(mask, 16) if mask else 0
    return tuple(i for i in range(bits.bit_length()) if bits >> i & 1)


def wire_order(order: Iterable[int]) -> str:
    """An expert ranking (ids, hottest first) as three hex digits per expert."""
    return "".join(f"{e:03x}" for e in order)


def order_of(text: str) -> tuple[int, ...]:
    return tuple(int(text[i:i + 3], 16) for i in range(0, len(text), 3))


def _rankings(texts: list[str]) -> tuple[str, ...]:
    """Per model on disk: "" not shardable there, "s" shardable in the file's order, else the measured order."""
    for text in texts:
        if text in ("", "s"):
            continue
        n = len(text) // 3
        order = order_of(text) if not len(text) % 3 and _HEX_DIGITS.fullmatch(text) else ()
        if not order or len(set(order)) != n or max(order) != n - 1:
            raise ProtocolError("an expert ranking must list each of a model's experts once, three hex digits each")
    return tuple(texts)


_HEX_DIGITS = re.compile(r"[0-9a-f]+")


def _shard_mask(mask: str, experts: int) -> str:
    if mask and (any(c not in "0123456789abcdef" for c in mask) or int(mask, 16) >> experts or int(mask, 16) == 0):
        raise ProtocolError("a shard's expert mask must be lower-case hex naming some of the model's experts")
    return mask


@dataclass(frozen=True)
class DemandEntry:
    """Requests this node's proxy saw for one model: how many in the last window, and the last
    one's wall-clock time (nodes' counts are summed, so each reports only its own)."""

    model: str
    requests: int
    last_active: float  # unix time

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_wire(doc: Any) -> DemandEntry:
        if not isinstance(doc, dict):
            raise ProtocolError("demand entry is not an object")
        return DemandEntry(get_name(doc, "model", MAX_NAME_LEN, None) or _empty("demand model"),
                           get_int(doc, "requests", 0, MAX_REQUESTS), get_float(doc, "last_active", 0.0, MAX_UNIX_TIME))


@dataclass(frozen=True)
class OnDemand:
    """A model file a node has and would serve when the mesh wants it (not loaded now)."""

    name: str
    fingerprint: str = ""
    need_bytes: int = 0  # what it takes to run it solo here
    aliases: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "aliases": list(self.aliases)}

    @staticmethod
    def from_wire(doc: Any) -> OnDemand:
        if not isinstance(doc, dict):
            raise ProtocolError("on-demand model is not an object")
        return OnDemand(get_name(doc, "name", MAX_NAME_LEN, None) or _empty("on-demand name"), get_name(doc, "fingerprint", 64),
                        get_int(doc, "need_bytes", 0, 2**62, 0), get_names(doc, "aliases", MAX_ALIASES, MAX_ALIAS_LEN))


def _empty(what: str) -> str:
    raise ProtocolError(f"{what} must not be empty")


def _unique(items: tuple[Any, ...], key: str, what: str) -> tuple[Any, ...]:
    if len({getattr(i, key) for i in items}) != len(items):
        raise ProtocolError(f"{what} names one model twice")
    return items


@dataclass(frozen=True)
class PeerRecord:
    """What a node says about itself in gossip."""

    id: str  # endpoint id, 64 hex chars
    role: str = "standby"
    hostname: str = ""
    incarnation: str = ""  # random per process: tells a restart from a duplicate connection
    version: str = ""
    engine_version: str = ""
    devices: tuple[str, ...] = ()
    vram_bytes: int = 0  # the memory it offers to models, all of them together
    free_bytes: int = 0  # of that, what nothing here or lent to a host holds now
    models_on_disk: tuple[str, ...] = ()  # the models it was asked to serve (and so can lend a worker for)
    fingerprints: tuple[str, ...] = ()  # of each model on disk, same order: splits need the same file
    rankings: tuple[str, ...] = ()  # per model on disk: "" not expert-shardable here, "s" shardable in file order, else the measured order (order_of)
    hosting: tuple[HostedModel, ...] = ()  # models it runs llama-server for, with their state and split
    lending: tuple[str, ...] = ()  # models whose RPC worker runs here for a host's split, ready to attach
    demand: tuple[DemandEntry, ...] = ()  # requests its own proxy saw, per model (clients' count too)
    on_demand: tuple[OnDemand, ...] = ()  # files it would load when the mesh wants them (--on-demand)
    api_port: int = 0  # 0: no local API
    api_public: bool = False  # API bound beyond loopback (--listen-all)
    addrs: tuple[str, ...] = ()  # direct ip:port to dial
    relay: str = ""

    @property
    def models_served(self) -> tuple[str, ...]:
        """Ready to answer requests now (derived from `hosting`: one source of truth)."""
        return tuple(h.name for h in self.hosting if h.state == "ready")

    def to_wire(self) -> dict[str, Any]:
        doc = asdict(self)
        for k, v in doc.items():
            if isinstance(v, tuple):
                doc[k] = list(v)
        doc["hosting"] = [h.to_wire() for h in self.hosting]
        doc["demand"] = [d.to_wire() for d in self.demand]
        doc["on_demand"] = [o.to_wire() for o in self.on_demand]
        return doc

    @staticmethod
    def from_wire(doc: Any) -> PeerRecord:
        if not isinstance(doc, dict):
            raise ProtocolError("peer record is not an object")
        return PeerRecord(
            id=get_hex(doc, "id", 32).hex(),
            role=get_role(doc),
            hostname=get_name(doc, "hostname", MAX_HOSTNAME_LEN),
            incarnation=get_name(doc, "incarnation", 64),
            version=get_name(doc, "version", MAX_VERSION_LEN),
            engine_version=get_name(doc, "engine_version", MAX_VERSION_LEN),
            devices=get_names(doc, "devices", MAX_DEVICES, MAX_DEVICE_LEN),
            vram_bytes=get_int(doc, "vram_bytes", 0, 2**62, 0),
            free_bytes=get_int(doc, "free_bytes", 0, 2**62, 0),
            models_on_disk=get_names(doc, "models_on_disk", MAX_MODELS_ON_DISK, MAX_NAME_LEN),
            fingerprints=get_names(doc, "fingerprints", MAX_MODELS_ON_DISK, 64, allow_empty=True),  # "": not known yet
            rankings=_rankings(get_str_list(doc, "rankings", MAX_MODELS_ON_DISK, 3 * MAX_EXPERTS)),
            hosting=_hosting(get_list(doc, "hosting", MAX_HOSTED)),
            lending=get_names(doc, "lending", MAX_MODELS_ON_DISK, MAX_NAME_LEN),
            demand=_unique(tuple(DemandEntry.from_wire(d) for d in get_list(doc, "demand", MAX_DEMAND)), "model", "demand"),
            on_demand=_unique(tuple(OnDemand.from_wire(o) for o in get_list(doc, "on_demand", MAX_ON_DEMAND)), "name", "on_demand"),
            api_port=get_int(doc, "api_port", 0, 65535, 0),
            api_public=get_bool(doc, "api_public", False),
            addrs=get_addrs(doc),
            relay=get_relay(doc),
        )


def as_client(record: PeerRecord) -> PeerRecord:
    """A record as this node takes it from a peer admitted with a client token: a client, and
    nothing it says about serving, lending, memory or files on demand (it never enters plans or
    routes). Only the requests its proxy saw count: they are demand like any other."""
    return PeerRecord(id=record.id, role="client", hostname=record.hostname, incarnation=record.incarnation,
                      version=record.version, demand=record.demand, api_port=record.api_port, addrs=record.addrs, relay=record.relay)


def _hosting(docs: list[Any]) -> tuple[HostedModel, ...]:
    hosted = tuple(HostedModel.from_wire(h) for h in docs)
    if len({h.name for h in hosted}) != len(hosted):
        raise ProtocolError("a node hosts one model twice")
    return hosted


@dataclass(frozen=True)
class DialHint:
    """What gossip passes on about a member: enough to dial it, nothing more (its full record
    arrives from the peer itself once connected)."""

    id: str
    role: str = "standby"
    addrs: tuple[str, ...] = ()
    relay: str = ""

    @staticmethod
    def of(record: PeerRecord) -> DialHint:
        return DialHint(record.id, record.role, record.addrs, record.relay)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "addrs": list(self.addrs), "relay": self.relay}

    @staticmethod
    def from_wire(doc: Any) -> DialHint:
        if not isinstance(doc, dict):
            raise ProtocolError("peer hint is not an object")
        return DialHint(get_hex(doc, "id", 32).hex(), get_role(doc), get_addrs(doc), get_relay(doc))


def encoded_size(doc: Any) -> int:
    """Bytes `doc` takes in a frame (the same JSON encoding as wire.encode_frame)."""
    return len(json.dumps(doc, separators=(",", ":")))


def encode_gossip(me: PeerRecord, known: list[PeerRecord], budget: int = GOSSIP_BUDGET) -> dict[str, Any]:
    """Our own record, and how to dial each member we know, within `budget` encoded bytes.

    Our record goes first; hints that would pass the budget are left out (their members are
    still reachable through other members' frames), so however many or however big the
    records this node holds, its frame never exceeds the frame limit.
    """
    doc: dict[str, Any] = {"self": me.to_wire(), "peers": []}
    used = encoded_size(doc)
    for p in known[:MAX_PEERS_PER_FRAME]:
        hint = DialHint.of(p).to_wire()
        size = encoded_size(hint) + 1  # and its comma
        if used + size <= budget:
            doc["peers"].append(hint)
            used += size
    return doc


def decode_gossip(doc: dict[str, Any]) -> tuple[PeerRecord, list[DialHint]]:
    peers = doc.get("peers", [])
    if not isinstance(peers, list) or len(peers) > MAX_PEERS_PER_FRAME:
        raise ProtocolError("field 'peers' must be a list")
    return PeerRecord.from_wire(doc.get("self")), [DialHint.from_wire(p) for p in peers]


class EventKind(str, Enum):
    JOINED = "joined"
    UPDATED = "updated"
    LEFT = "left"


@dataclass(frozen=True)
class MeshEvent:
    kind: EventKind
    peer: PeerRecord
    reason: str = ""


@dataclass
class Member:
    record: PeerRecord
    last_seen: float  # its last gossip frame
    rtt_ms: float | None = None
    last_signal: float = 0.0  # the last time its connection carried anything (acks included)

    def quiet_since(self) -> float:
        return max(self.last_seen, self.last_signal)


@dataclass
class Membership:
    """Who is in the mesh as this node sees it, and what changed."""

    self_id: str
    members: dict[str, Member] = field(default_factory=dict)
    dial_failed_at: dict[str, float] = field(default_factory=dict)

    def admit(self, record: PeerRecord, now: float) -> MeshEvent:
        self.members[record.id] = Member(record, now)
        self.dial_failed_at.pop(record.id, None)
        return MeshEvent(EventKind.JOINED, record)

    def heard_from(self, record: PeerRecord, now: float, rtt_ms: float | None = None) -> MeshEvent | None:
        """A gossip frame from a member: refresh it, report if its record changed."""
        m = self.members.get(record.id)
        if m is None:
            return None
        m.last_seen = now
        if rtt_ms is not None:
            m.rtt_ms = rtt_ms if m.rtt_ms is None else 0.7 * m.rtt_ms + 0.3 * rtt_ms
        if record != m.record:
            m.record = record
            return MeshEvent(EventKind.UPDATED, record)
        return None

    def remove(self, peer_id: str, reason: str) -> MeshEvent | None:
        m = self.members.pop(peer_id, None)
        return MeshEvent(EventKind.LEFT, m.record, reason) if m else None

    def excuse(self, secs: float) -> None:
        """This node itself was held up for `secs` (its loop blocked, its process starved): its
        members could not be heard meanwhile, so that time does not count as their silence."""
        for m in self.members.values():
            m.last_seen += secs
            m.last_signal += secs

    def signal(self, peer_id: str, now: float) -> None:
        """The member's connection received packets: its machine and process are alive."""
        if (m := self.members.get(peer_id)) is not None:
            m.last_signal = now

    def silent(self, now: float, limit: float = DEAD_AFTER_SECS, hung_limit: float = HUNG_AFTER_SECS) -> list[str]:
        """Members to drop: nothing at all heard for `limit`, or no gossip for `hung_limit`."""
        return [pid for pid, m in self.members.items() if now - m.quiet_since() > limit or now - m.last_seen > hung_limit]

    def why_silent(self, peer_id: str, now: float) -> str:
        m = self.members[peer_id]
        if now - m.quiet_since() > DEAD_AFTER_SECS:
            return f"silent for {now - m.quiet_since():.1f} s"
        return f"connected but no gossip for {now - m.last_seen:.1f} s"

    def note_dial_failure(self, peer_id: str, now: float) -> None:
        self.dial_failed_at[peer_id] = now

    def has_room_for(self, peer_id: str, client: bool = False) -> bool:
        """Whether admitting `peer_id` keeps this node within MAX_MEMBERS, or for a client
        within MAX_CLIENTS (a known member always fits)."""
        if peer_id in self.members:
            return True
        clients = sum(1 for m in self.members.values() if m.record.role == "client")
        return clients < MAX_CLIENTS if client else len(self.members) - clients < MAX_MEMBERS

    def to_dial(self, discovered: list[DialHint], now: float) -> list[DialHint]:
        """Peers learned from gossip that this node should connect to (full mesh).

        Nobody dials a client (clients dial in, and may sit behind NAT);
        peers that failed recently wait out a backoff; a full node dials nobody new.
        """
        # throw-away ids must not pile up here: a failure older than the backoff says nothing
        self.dial_failed_at = {pid: at for pid, at in self.dial_failed_at.items() if now - at < REDIAL_BACKOFF_SECS}
        out: dict[str, DialHint] = {}
        room = MAX_MEMBERS - sum(1 for m in self.members.values() if m.record.role != "client")
        for p in discovered:
            if len(out) >= room:
                break
            if p.id == self.self_id or p.id in self.members or p.role == "client":
                continue
            if not p.addrs and not p.relay:
                continue
            failed = self.dial_failed_at.get(p.id)
            if failed is not None and now - failed < REDIAL_BACKOFF_SECS:
                continue
            out[p.id] = p
        return list(out.values())

    def records(self) -> list[PeerRecord]:
        return [m.record for m in self.members.values()]


def rank_hints(hints_by_source: dict[str, list[DialHint]]) -> list[DialHint]:
    """All hints, one per id: those more members vouch for first, then each source's first
    hints before anyone's later ones, so one peer's long list cannot crowd out the rest."""
    best: dict[str, tuple[int, int, DialHint]] = {}  # id -> (vouchers, best position, hint)
    for hints in hints_by_source.values():
        seen_here: set[str] = set()
        for pos, h in enumerate(hints):
            if h.id in seen_here:
                continue
            seen_here.add(h.id)
            vouchers, first, _ = best.get(h.id, (0, pos, h))
            best[h.id] = (vouchers + 1, min(first, pos), h)
    return [h for _, _, h in sorted(best.values(), key=lambda e: (-e[0], e[1]))]


@dataclass
class DialLimiter:
    """How many dials of gossip-learned ids may start: a cap on those in flight and a token
    bucket (`per_sec`, bursts of `burst`). Pure: the caller passes the time."""

    at_once: int = HINTED_DIALS_AT_ONCE
    per_sec: float = HINTED_DIALS_PER_SEC
    burst: int = HINTED_DIAL_BURST
    in_flight: int = 0
    _tokens: float = field(default=-1.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    def try_start(self, now: float) -> bool:
        if self._last is None or self._tokens < 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_sec)
        self._last = now
        if self.in_flight >= self.at_once or self._tokens < 1:
            return False
        self._tokens -= 1
        self.in_flight += 1
        return True

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


def keep_new_connection(existing_incarnation: str, new_incarnation: str, existing_dialer: str, new_dialer: str, lower_id: str) -> bool:
    """Two admitted connections to one peer: which survives.

    A new incarnation means the peer restarted, so the old connection is stale.
    Otherwise both sides dialed at once; both keep the one dialed by the lower id.
    """
    if new_incarnation != existing_incarnation:
        return True
    return new_dialer == lower_id and existing_dialer != lower_id

