"""Peer records and membership rules (pure: no sockets, no clocks of its own).

A member is a peer this node holds an admitted connection to; the mesh is a
full mesh, so gossip is only needed to *discover* whom to dial. Each gossip
frame carries the sender's own record plus the dial addresses of its members.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from mesh_llm.mesh.wire import ProtocolError, get_bool, get_float, get_hex, get_int, get_list, get_str, get_str_list

HEARTBEAT_SECS = 1.5  # gossip with every member this often
DEAD_AFTER_SECS = 6.0  # a member silent this long is dropped: at most ~7.5 s after it died (bound: 10 s)
REDIAL_BACKOFF_SECS = 5.0  # don't re-dial a peer that just failed more often than this
MAX_PEERS_PER_FRAME = 256

ROLES = ("host", "worker", "client", "standby")
MODEL_STATES = ("ready", "loading", "planning", "waiting", "error", "unloading")  # what we send; newer peers may add more
HOLDING_STATES = ("ready", "loading", "unloading")  # a model in these holds its memory
MAX_HOSTED = 8  # models one node runs llama-server for
MAX_SLICES = 32  # nodes in one split
MAX_ALIASES = 4  # names a model answers to besides its id
MAX_ALIAS_LEN = 256
MAX_DETAIL = 512
MAX_MODELS_ON_DISK = 64


def get_role(doc: dict[str, Any]) -> str:
    role = get_str(doc, "role", 16, "standby")
    if role not in ROLES:
        raise ProtocolError(f"unknown role {role!r}")
    return role


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

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "split": [asdict(s) for s in self.split], "aliases": list(self.aliases)}

    @property
    def holds_memory(self) -> bool:
        return self.state in HOLDING_STATES

    @staticmethod
    def from_wire(doc: Any) -> HostedModel:
        if not isinstance(doc, dict):
            raise ProtocolError("hosted model is not an object")
        name = get_str(doc, "name", 256)
        if not name or not name.isprintable():  # it ends up in copy-paste commands and on pages
            raise ProtocolError("hosted model name must be printable text")
        split = tuple(Slice.from_wire(s) for s in get_list(doc, "split", MAX_SLICES))
        if len({s.node for s in split}) != len(split):
            raise ProtocolError("a split names a node twice")
        return HostedModel(
            name=name,
            state=get_str(doc, "state", 16),
            detail=get_str(doc, "detail", MAX_DETAIL, ""),
            size_bytes=get_int(doc, "size_bytes", 0, 2**62, 0),
            need_bytes=get_int(doc, "need_bytes", 0, 2**62, 0),
            ctx=get_int(doc, "ctx", 0, 1 << 24, 0),
            draft=get_str(doc, "draft", 256, ""),
            draft_bytes=get_int(doc, "draft_bytes", 0, 2**62, 0),
            split=split,
            aliases=tuple(a for a in get_str_list(doc, "aliases", MAX_ALIASES, MAX_ALIAS_LEN) if a.isprintable()),
        )


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
    hosting: tuple[HostedModel, ...] = ()  # models it runs llama-server for, with their state and split
    lending: tuple[str, ...] = ()  # models whose RPC worker runs here for a host's split, ready to attach
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
        return doc

    @staticmethod
    def from_wire(doc: Any) -> PeerRecord:
        if not isinstance(doc, dict):
            raise ProtocolError("peer record is not an object")
        return PeerRecord(
            id=get_hex(doc, "id", 32).hex(),
            role=get_role(doc),
            hostname=get_str(doc, "hostname", 255, ""),
            incarnation=get_str(doc, "incarnation", 64, ""),
            version=get_str(doc, "version", 64, ""),
            engine_version=get_str(doc, "engine_version", 64, ""),
            devices=tuple(get_str_list(doc, "devices", 64, 128)),
            vram_bytes=get_int(doc, "vram_bytes", 0, 2**62, 0),
            free_bytes=get_int(doc, "free_bytes", 0, 2**62, 0),
            models_on_disk=tuple(get_str_list(doc, "models_on_disk", MAX_MODELS_ON_DISK, 256)),
            fingerprints=tuple(get_str_list(doc, "fingerprints", MAX_MODELS_ON_DISK, 64)),
            hosting=_hosting(get_list(doc, "hosting", MAX_HOSTED)),
            lending=tuple(get_str_list(doc, "lending", MAX_MODELS_ON_DISK, 256)),
            api_port=get_int(doc, "api_port", 0, 65535, 0),
            api_public=get_bool(doc, "api_public", False),
            addrs=tuple(get_str_list(doc, "addrs", 32, 64)),
            relay=get_str(doc, "relay", 256, ""),
        )


def as_client(record: PeerRecord) -> PeerRecord:
    """A record as this node takes it from a peer admitted with a client token: a client, and
    nothing it says about serving, lending or memory (it never enters plans or routes)."""
    return PeerRecord(id=record.id, role="client", hostname=record.hostname, incarnation=record.incarnation,
                      version=record.version, api_port=record.api_port, addrs=record.addrs, relay=record.relay)


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
        return DialHint(get_hex(doc, "id", 32).hex(), get_role(doc), tuple(get_str_list(doc, "addrs", 32, 64)), get_str(doc, "relay", 256, ""))


def encode_gossip(me: PeerRecord, known: list[PeerRecord]) -> dict[str, Any]:
    """Our own record, and how to dial each member we know (at most a few KiB per member)."""
    return {"self": me.to_wire(), "peers": [DialHint.of(p).to_wire() for p in known[:MAX_PEERS_PER_FRAME]]}


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
    last_seen: float
    rtt_ms: float | None = None


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

    def silent(self, now: float, limit: float = DEAD_AFTER_SECS) -> list[str]:
        return [pid for pid, m in self.members.items() if now - m.last_seen > limit]

    def note_dial_failure(self, peer_id: str, now: float) -> None:
        self.dial_failed_at[peer_id] = now

    def to_dial(self, discovered: list[DialHint], now: float) -> list[DialHint]:
        """Peers learned from gossip that this node should connect to (full mesh).

        Nobody dials a client (clients dial in, and may sit behind NAT);
        peers that failed recently wait out a backoff.
        """
        out: dict[str, DialHint] = {}
        for p in discovered:
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


def keep_new_connection(existing_incarnation: str, new_incarnation: str, existing_dialer: str, new_dialer: str, lower_id: str) -> bool:
    """Two admitted connections to one peer: which survives.

    A new incarnation means the peer restarted, so the old connection is stale.
    Otherwise both sides dialed at once; both keep the one dialed by the lower id.
    """
    if new_incarnation != existing_incarnation:
        return True
    return new_dialer == lower_id and existing_dialer != lower_id

