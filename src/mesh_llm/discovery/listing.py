"""Mesh listings (pure): what a published mesh tells strangers, checked like hostile input.

A listing is the JSON content of a Nostr event (NIP-89 kind 31990, `d` = the mesh id,
`k` = mesh-llm, an `expiration` tag). Anyone can publish anything to a relay, so every
listing read back is decoded strictly: bounded sizes, counts and numbers, printable names,
a token that decodes and belongs to the mesh the listing names. A listing carries the
mesh's CLIENT token unless its publisher chose to share the member token
(`--publish-member-token`): strangers who find a mesh may use its models, not serve them.

Discovery sorts meshes by node count, then memory (both descending), as the original does;
`score` is shown beside them and follows the original's weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mesh_llm.mesh.token import TokenError, decode_token

KIND = 31990  # NIP-89 application handler: a parameterised replaceable event
APP_TAG = "mesh-llm"  # the `k` tag every listing carries (what discovery asks relays for)
FORMAT = 1  # the listing document's own version (`v`)
REPUBLISH_SECS = 60.0
EXPIRY_SECS = 120.0  # twice the republish interval: one lost publish does not delist
FRESH_SECS = 120
OK_SECS = 300
DEFAULT_RELAYS = ("wss://relay.damus.io", "wss://nos.lol", "wss://relay.nostr.band", "wss://nostr.land", "wss://nostr.wine")

MAX_CONTENT_CHARS = 16_384
MAX_NAME_CHARS = 64
MAX_REGION_CHARS = 32
MAX_MODELS = 64
MAX_MODEL_CHARS = 200
MAX_VERSION_CHARS = 32
MAX_COUNT = 100_000
MAX_BYTES = 1 << 60  # an exabyte: beyond any real mesh
_VERSION = re.compile(r"^\d{1,6}(\.[0-9A-Za-z+\-.]{1,24})?$")
_MESH_ID = re.compile(r"^[0-9a-f]{32}$")


class ListingError(ValueError):
    """A listing that cannot be used; `reason` is the count it is skipped under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Listing:
    mesh_id: str  # 32 hex chars
    token: str  # an invite token: the client token unless the publisher shares the member one
    version: str  # mesh-llm version of the publisher
    name: str | None = None  # --mesh-name
    region: str | None = None
    serving: tuple[str, ...] = ()  # models the mesh answers for now
    wanted: tuple[str, ...] = ()  # models requested that nobody serves
    node_count: int = 1  # members and clients
    total_bytes: int = 0  # memory the members offer
    free_bytes: int = 0
    client_count: int = 0
    max_clients: int | None = None
    token_kind: str = "client"  # derived from the token on decode, never trusted from the document
    group: str = field(default="", compare=False)  # digest of the mesh's clients' secret (from the token): listings of one mesh share it, a copycat's differ

    def encode(self) -> str:
        doc: dict[str, Any] = {
            "v": FORMAT, "mesh_id": self.mesh_id, "token": self.token, "version": self.version,
            "serving": list(self.serving), "wanted": list(self.wanted), "node_count": self.node_count,
            "total_vram_bytes": self.total_bytes, "free_vram_bytes": self.free_bytes,
            "client_count": self.client_count, "max_clients": self.max_clients,
        }
        if self.name is not None:
            doc["name"] = self.name
        if self.region is not None:
            doc["region"] = self.region
        return json.dumps(doc, separators=(",", ":"))

    @property
    def full(self) -> bool:
        return self.max_clients is not None and self.client_count >= self.max_clients

    def serves(self, model: str) -> bool:
        needle = model.lower()
        return any(needle in m.lower() for m in self.serving)

    def mentions(self, model: str) -> bool:
        needle = model.lower()
        return any(needle in m.lower() for m in (*self.serving, *self.wanted))


def printable(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable() and value.strip() == value


def check_name(text: str, what: str = "--mesh-name") -> str:
    """A mesh name or region the user typed: the same rules a listing read back must pass."""
    limit = MAX_NAME_CHARS if what == "--mesh-name" else MAX_REGION_CHARS
    if not printable(text, limit):
        raise ValueError(f"{what} {text[:80]!r} must be 1-{limit} printable characters, no leading or trailing spaces")
    return text


def _int(doc: dict[str, Any], key: str, limit: int, default: int | None = None) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ListingError("malformed", f"bad {key!r}")
    return value


def _models(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_MODELS or not all(printable(m, MAX_MODEL_CHARS) for m in value):
        raise ListingError("malformed", f"bad {key!r}")
    return tuple(dict.fromkeys(value))


def _optional_text(doc: dict[str, Any], key: str, limit: int) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not printable(value, limit):
        raise ListingError("malformed", f"bad {key!r}")
    return str(value)


def decode_listing(text: object) -> Listing:
    """The listing in an event's content, or ListingError saying why it is unusable."""
    if not isinstance(text, str) or len(text) > MAX_CONTENT_CHARS:
        raise ListingError("malformed", "content missing or too large")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ListingError("malformed", "content is not JSON") from None
    if not isinstance(doc, dict):
        raise ListingError("malformed", "content is not an object")
    if doc.get("withdrawn") is True:
        raise ListingError("withdrawn", "the mesh was delisted")
    fmt = doc.get("v")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ListingError("malformed", "bad 'v'")
    if fmt > FORMAT:
        raise ListingError("version", f"listing format v{fmt} is newer than this mesh-llm's")
    version = doc.get("version")
    if not printable(version, MAX_VERSION_CHARS) or not _VERSION.match(str(version)):
        raise ListingError("malformed", "bad 'version'")
    mesh_id = doc.get("mesh_id")
    if not isinstance(mesh_id, str) or not _MESH_ID.match(mesh_id):
        raise ListingError("malformed", "bad 'mesh_id'")
    token = doc.get("token")
    if not isinstance(token, str):
        raise ListingError("malformed", "no token")
    try:
        decoded = decode_token(token)
    except TokenError:
        raise ListingError("malformed", "token does not decode") from None
    if decoded.mesh.mesh_id.hex() != mesh_id:
        raise ListingError("malformed", "token belongs to another mesh than the listing names")
    clients_secret = decoded.mesh.secret_for("client")
    assert clients_secret is not None  # every holder can derive the clients' secret
    max_clients = doc.get("max_clients")
    if max_clients is not None:
        max_clients = _int(doc, "max_clients", MAX_COUNT)
    total = _int(doc, "total_vram_bytes", MAX_BYTES, 0)
    free = _int(doc, "free_vram_bytes", MAX_BYTES, 0)
    nodes = _int(doc, "node_count", MAX_COUNT)
    clients = _int(doc, "client_count", MAX_COUNT, 0)
    if free > total or clients > nodes or nodes < 1:
        raise ListingError("malformed", "figures do not add up")
    return Listing(
        mesh_id=mesh_id, token=token, version=str(version), name=_optional_text(doc, "name", MAX_NAME_CHARS),
        region=_optional_text(doc, "region", MAX_REGION_CHARS), serving=_models(doc, "serving"), wanted=_models(doc, "wanted"),
        node_count=nodes, total_bytes=total, free_bytes=free, client_count=clients, max_clients=max_clients,
        token_kind=decoded.mesh.kind, group=hashlib.sha256(b"mesh-llm/listing-group/v1" + clients_secret).hexdigest()[:32],
    )


def major(version: str) -> str:
    """The part of a version that must match: the major, or major.minor before 1.0 (0.x may break at each minor)."""
    parts = version.split(".")
    return ".".join(parts[:2]) if parts[0] == "0" else parts[0]


def compatible(version: str, ours: str) -> bool:
    """Meshes of another major version (another minor before 1.0) speak another protocol: not offered."""
    return major(version) == major(ours)


def freshness(published_at: float, now: float) -> str:
    age = now - published_at
    return "fresh" if age < FRESH_SECS else "ok" if age < OK_SECS else "stale"


@dataclass(frozen=True)
class Found:
    """A listing as read from a relay: who signed it and when."""

    listing: Listing
    publisher: str  # hex public key of the Nostr key that signed it ("lan:" + node id when heard on the LAN)
    published_at: int
    expires_at: int | None = None
    source: str = "nostr"  # "nostr", "lan", or "nostr+lan" when both carried it


def score(listing: Listing) -> int:
    """The original's weights: unnamed meshes first, full ones never, bigger and busier better."""
    points = 100
    if listing.name is None or listing.name.lower() == APP_TAG:
        points += 300
    if listing.full:
        points -= 1000
    elif listing.max_clients is not None:
        points += min(listing.max_clients - listing.client_count, 20)
    points += min(listing.node_count, 10) * 5 + 10 * len(listing.serving) + 15 * len(listing.wanted)
    return points


@dataclass
class Skipped:
    """Why listings were not offered, counted (shown by `discover`)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


@dataclass(frozen=True)
class RawListing:
    """An event's parts, after the signature check (the shell does it): content and tags."""

    publisher: str
    created_at: int
    content: str
    tags: tuple[tuple[str, ...], ...]
    signed: bool = True


def _tag(tags: Iterable[tuple[str, ...]], name: str) -> str | None:
    return next((t[1] for t in tags if len(t) >= 2 and t[0] == name), None)


MAX_CLOCK_SKEW_SECS = 600  # a listing dated further ahead than this is not believed
MAX_LIFETIME_SECS = 3600  # nor one that says it stays valid longer than this after it was made
_DIGITS = re.compile(r"[0-9]{1,15}")


def _key(listing: Listing) -> tuple[str, str]:
    """Listings replace each other only within one mesh: same id and same clients' secret.
    A stranger's copy under another mesh's id (its own secret) cannot hide the real one."""
    return listing.mesh_id, listing.group


def read_listings(raws: Iterable[RawListing], now: float, our_version: str, skipped: Skipped | None = None) -> list[Found]:
    """The usable listings among raw events: signed, well-formed, unexpired, not from the future,
    our version; the newest per mesh. Everything dropped is counted in `skipped` by reason."""
    skipped = skipped if skipped is not None else Skipped()
    newest: dict[tuple[str, str], Found] = {}
    for raw in raws:
        try:
            found = _read_one(raw, now, our_version)
        except ListingError as exc:
            if exc.reason != "withdrawn":  # a clean exit, not a fault
                skipped.add(exc.reason)
            continue
        except Exception:  # noqa: BLE001 - whatever a stranger published is skipped, never a crash
            skipped.add("malformed")
            continue
        seen = newest.get(_key(found.listing))
        if seen is None or seen.published_at < found.published_at:
            newest[_key(found.listing)] = found
    return sort_found(newest.values())


def _read_one(raw: RawListing, now: float, our_version: str) -> Found:
    if not raw.signed:
        raise ListingError("forged", "bad signature")
    expiration = _tag(raw.tags, "expiration")
    if expiration is None or not _DIGITS.fullmatch(expiration):
        raise ListingError("malformed", "no expiration")  # ours always carry one: a listing that never expires is not ours
    expires_at = int(expiration)
    if expires_at <= now:
        raise ListingError("expired", "expired")
    if raw.created_at > now + MAX_CLOCK_SKEW_SECS or expires_at > raw.created_at + MAX_LIFETIME_SECS:
        raise ListingError("bad times", "dated in the future or valid for too long")
    listing = decode_listing(raw.content)
    if _tag(raw.tags, "d") != listing.mesh_id:
        raise ListingError("malformed", "d tag is not the mesh id")
    if not compatible(listing.version, our_version):
        raise ListingError("version", "another version")
    return Found(listing, raw.publisher, raw.created_at, expires_at)


@dataclass(frozen=True)
class PrivateMesh:
    """A mesh heard on the LAN that is not published: it cannot be joined without a token."""

    mesh_id: str
    name: str | None
    nodes: int  # how many of its members announce here
    version: str


def read_lan(announced: Iterable[tuple[str, str, str, str, dict[str, Any] | None]], now: float, our_version: str,
             skipped: Skipped | None = None) -> tuple[list[Found], list[PrivateMesh]]:
    """LAN announcements -> the published meshes' listings (checked exactly like a relay's, and
    for the mesh the announcement names) and the private meshes, one entry per mesh.
    `announced`: (mesh id, node id, version, name, listing or None) per announcing node."""
    skipped = skipped if skipped is not None else Skipped()
    listed: dict[tuple[str, str], Found] = {}
    private: dict[str, list[tuple[str, str]]] = {}
    for mesh_id, node_id, version, name, doc in announced:
        if doc is None:
            private.setdefault(mesh_id, []).append((name, version))
            continue
        try:
            listing = decode_listing(json.dumps(doc))
        except ListingError as exc:
            if exc.reason != "withdrawn":
                skipped.add(exc.reason)
            continue
        except Exception:  # noqa: BLE001 - a stranger's announcement is skipped, never a crash
            skipped.add("malformed")
            continue
        if listing.mesh_id != mesh_id:
            skipped.add("malformed")
            continue
        if not compatible(listing.version, our_version):
            skipped.add("version")
            continue
        listed.setdefault(_key(listing), Found(listing, f"lan:{node_id}", int(now), None, "lan"))
    ids = {m for m, _ in listed}
    hidden = [PrivateMesh(m, next((n for n, _ in seen if n), None), len(seen), seen[0][1])
              for m, seen in sorted(private.items()) if m not in ids]
    return sort_found(listed.values()), hidden


def merge_found(nostr: Iterable[Found], lan: Iterable[Found]) -> list[Found]:
    """One entry per mesh: what the LAN says now (it was heard live) wins over a relay's copy of
    the same mesh (same id and secret); a copycat's never replaces the other's."""
    out = {_key(f.listing): f for f in nostr}
    for f in lan:
        both = _key(f.listing) in out
        out[_key(f.listing)] = replace(f, source="nostr+lan") if both else f
    return sort_found(out.values())


def sort_found(found: Iterable[Found]) -> list[Found]:
    """Full meshes last; then node count, then memory, descending; then the newest."""
    return sorted(found, key=lambda f: (f.listing.full, -f.listing.node_count, -f.listing.total_bytes, -f.published_at, f.listing.mesh_id))


@dataclass(frozen=True)
class Query:
    model: str | None = None  # substring of a model served (or wanted, unless serving_only)
    region: str | None = None  # exact, case-insensitive
    min_vram_gb: float | None = None  # the mesh's total memory
    serving_only: bool = False

    def matches(self, listing: Listing) -> bool:
        if self.model and not (listing.serves(self.model) if self.serving_only else listing.mentions(self.model)):
            return False
        if self.region and (listing.region or "").lower() != self.region.lower():
            return False
        return not (self.min_vram_gb is not None and listing.total_bytes < self.min_vram_gb * 1e9)


def narrow(found: Iterable[Found], query: Query) -> list[Found]:
    return [f for f in found if query.matches(f.listing)]


def best_for_auto(found: Iterable[Found], query: Query, mesh_name: str | None, need_member: bool, now: float | None = None) -> Found | None:
    """The mesh `--auto` joins: the first (in discovery order) that matches, is not full, not
    stale, and is the named mesh (by name, case-insensitive) or, without a name, an unnamed one.
    A node that serves needs a listing carrying the member token."""
    for f in sort_found(narrow(found, query)):
        listing = f.listing
        if listing.full or (need_member and listing.token_kind != "member"):
            continue
        if now is not None and freshness(f.published_at, now) == "stale":
            continue
        if mesh_name is not None:
            if (listing.name or "").lower() == mesh_name.lower():
                return f
        elif listing.name is None or listing.name.lower() == APP_TAG:
            return f
    return None


def listing_from_status(doc: dict[str, Any], *, token: str, version: str, name: str | None, region: str | None,
                        max_clients: int | None) -> Listing:
    """This node's listing, from its own /api/status document (what the mesh serves and holds)."""
    nodes = doc.get("nodes", [])
    members = [n for n in nodes if n.get("role") != "client"]
    served = list(doc.get("api", {}).get("models", []))
    wanted = [m["model"] for m in doc.get("demand", {}).get("models", []) if m.get("model") not in served and not m.get("servers")]
    total = sum(int(n.get("memory_bytes") or 0) for n in members)
    free = min(total, sum(int(n.get("free_bytes") or 0) for n in members))
    return Listing(
        mesh_id=str(doc.get("mesh", {}).get("id", "")), token=token, version=version, name=name, region=region,
        serving=tuple(m for m in served if printable(m, MAX_MODEL_CHARS))[:MAX_MODELS],
        wanted=tuple(m for m in wanted if printable(m, MAX_MODEL_CHARS))[:MAX_MODELS],
        node_count=max(1, len(nodes)), total_bytes=total, free_bytes=free, client_count=len(nodes) - len(members),
        max_clients=max_clients, token_kind=decode_token(token).mesh.kind,
    )


def found_json(f: Found, now: float) -> dict[str, Any]:
    """One mesh as `discover --json` prints it."""
    x = f.listing
    return {
        "name": x.name, "mesh_id": x.mesh_id, "nodes": x.node_count, "total_memory_bytes": x.total_bytes,
        "free_memory_bytes": x.free_bytes, "serving": list(x.serving), "wanted": list(x.wanted), "region": x.region,
        "clients": x.client_count, "max_clients": x.max_clients, "full": x.full, "version": x.version,
        "token_kind": x.token_kind, "token": x.token, "publisher": f.publisher, "published_at": f.published_at,
        "expires_at": f.expires_at, "age_secs": max(0, int(now - f.published_at)), "freshness": freshness(f.published_at, now),
        "score": score(x), "source": f.source, "group": x.group,
    }
