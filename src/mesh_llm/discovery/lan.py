"""LAN discovery: member nodes announce their mesh with mDNS (`_mesh-llm._udp.local.`), no server needed.

What an announcement carries (TXT record, one key=value string each, at most 255 bytes):
  v      format version ("1"); a newer one is skipped by older readers
  mesh   the mesh id (32 hex: public, it only tells meshes apart)
  node   the announcing node's id (64 hex: its iroh public key)
  sw     the mesh-llm version it runs
  name   the mesh's name, if it has one (printable, at most 64 characters)
  a0..a7 its QUIC dial addresses ("ip:port")
  ln, l0..  only for a mesh published publicly (`listing` given): the same listing the public
         directory carries, JSON in chunks, token included. A private mesh's secret is never in it.

Reading is bounded and validated (`parse_txt`): counts, sizes, types, printable text, hex ids,
dial addresses; a record that fails is skipped with a reason, never a crash.

Two uses:
  * `LanAnnouncer` (one per member node, started and closed with it): announces, and watches
    the LAN for announcements of its own mesh; a node id that was a member this run and is not
    connected is handed to `Mesh.hint` with its announced addresses (a DHCP change: peers find
    each other again without a new token; the handshake still proves the secret both ways).
  * Browsing, for `mesh-llm discover` / `--auto`: `browse_lan(timeout)` -> the parsed `LanMesh`
    of every announcing node; discovery/listing.read_lan checks a published mesh's listing
    exactly like one from a relay and keeps private meshes apart (not joinable without a token).
    `lan_listings(timeout)` gives the same as plain dicts (a private mesh as
        {"private": True, "mesh_id": hex, "name": str, "node_id": hex, "addrs": [..], "version": str}).

Interfaces: IPv4 multicast on every interface (zeroconf's InterfaceChoice.All); set
MESH_LLM_LAN_INTERFACES to a comma-separated list of local IP addresses to choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh_llm import __version__
from mesh_llm.mesh.peers import MAX_DIAL_ADDRS, is_dial_addr, own_dial_addrs

SERVICE_TYPE = "_mesh-llm._udp.local."
LAN_FORMAT = "1"
INTERFACES_ENV = "MESH_LLM_LAN_INTERFACES"
MAX_TXT_KEYS = 48  # entries in one record; more and it is skipped
MAX_KEY_LEN = 16
MAX_VALUE_LEN = 250  # key=value must fit the 255-byte TXT string
MAX_NAME_LEN = 64
MAX_VERSION_LEN = 64
LISTING_CHUNK = 200
MAX_LISTING_CHUNKS = 20  # 4000 bytes of listing JSON
MAX_LISTING_BYTES = LISTING_CHUNK * MAX_LISTING_CHUNKS
MAX_SEEN = 256  # announcements one browse keeps (a flood of names must not grow without bound)
RESOLVE_MS = 3000
RESOLVING_AT_ONCE = 16
REFRESH_SECS = 10.0  # an announcer checks its own addresses this often (DHCP)


class BadAnnouncement(ValueError):
    """A TXT record this reader cannot use; the message says why."""


@dataclass(frozen=True)
class LanMesh:
    """One node's announcement, validated."""

    mesh_id: str
    node_id: str
    version: str
    name: str = ""
    addrs: tuple[str, ...] = ()
    listing: dict[str, Any] | None = field(default=None, compare=False)

    def to_listing(self) -> dict[str, Any]:
        if self.listing is not None:
            return dict(self.listing)
        return {"private": True, "mesh_id": self.mesh_id, "name": self.name, "node_id": self.node_id, "addrs": list(self.addrs), "version": self.version}


def _hex(text: str, size: int) -> bool:
    return len(text) == 2 * size and all(c in "0123456789abcdef" for c in text)


def _printable(text: str, max_len: int) -> bool:
    return 0 < len(text) <= max_len and text.isprintable()


def encode_txt(*, mesh_id: str, node_id: str, addrs: tuple[str, ...] | list[str], version: str = __version__, name: str | None = None,
               listing: dict[str, Any] | None = None) -> dict[str, str]:
    """The TXT entries for an announcement (pure). Raises ValueError for what would not fit."""
    if not _hex(mesh_id, 16) or not _hex(node_id, 32):
        raise ValueError("mesh id and node id must be lowercase hex of 16 and 32 bytes")
    txt = {"v": LAN_FORMAT, "mesh": mesh_id, "node": node_id, "sw": version[:MAX_VERSION_LEN]}
    if name:
        if not _printable(name, MAX_NAME_LEN) or len(name.encode()) > MAX_VALUE_LEN:
            raise ValueError(f"a mesh name is printable text of at most {MAX_NAME_LEN} characters")
        txt["name"] = name
    for i, a in enumerate(own_dial_addrs(addrs)):
        txt[f"a{i}"] = a
    if listing is not None:
        raw = json.dumps(listing, separators=(",", ":"), ensure_ascii=True)
        if len(raw) > MAX_LISTING_BYTES:
            raise ValueError(f"the listing is {len(raw)} bytes of JSON; a LAN announcement carries at most {MAX_LISTING_BYTES}")
        chunks = [raw[i:i + LISTING_CHUNK] for i in range(0, len(raw), LISTING_CHUNK)]
        txt["ln"] = str(len(chunks))
        for i, chunk in enumerate(chunks):
            txt[f"l{i}"] = chunk
    return txt


def _text(props: Mapping[Any, Any]) -> dict[str, str]:
    if not isinstance(props, Mapping):
        raise BadAnnouncement("TXT record is not a set of entries")
    if len(props) > MAX_TXT_KEYS:
        raise BadAnnouncement(f"TXT record has {len(props)} entries (at most {MAX_TXT_KEYS})")
    out: dict[str, str] = {}
    for k, v in props.items():
        try:
            key = k.decode("ascii") if isinstance(k, bytes) else k
            value = v.decode("utf-8") if isinstance(v, bytes) else v
        except UnicodeDecodeError:
            raise BadAnnouncement("TXT entry is not text") from None
        if not isinstance(key, str) or not isinstance(value, str | None):
            raise BadAnnouncement("TXT entry is not text")
        if value is None:
            continue  # a bare key (RFC 6763 boolean): none of ours
        if not _printable(key, MAX_KEY_LEN) or not key.isascii() or len(value) > MAX_VALUE_LEN or not value.isprintable():
            raise BadAnnouncement("TXT entry too long or not printable")
        out[key.lower()] = value
    return out


def _listing(txt: dict[str, str]) -> dict[str, Any] | None:
    n_text = txt.get("ln")
    if n_text is None:
        return None
    if not n_text.isascii() or not n_text.isdigit() or not 1 <= int(n_text) <= MAX_LISTING_CHUNKS:  # "²" is a digit to isdigit
        raise BadAnnouncement("bad listing chunk count")
    parts = []
    for i in range(int(n_text)):
        part = txt.get(f"l{i}")
        if part is None:
            raise BadAnnouncement(f"listing chunk {i} is missing")
        parts.append(part)
    raw = "".join(parts)
    if len(raw) > MAX_LISTING_BYTES:
        raise BadAnnouncement("listing too long")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadAnnouncement("listing is not JSON") from None
    if not isinstance(doc, dict):
        raise BadAnnouncement("listing is not a JSON object")
    return doc


def parse_txt(props: Mapping[Any, Any]) -> LanMesh:
    """An announcement's TXT entries (bytes or str keys and values) -> LanMesh, or BadAnnouncement (pure)."""
    txt = _text(props)
    v = txt.get("v")
    if v != LAN_FORMAT:
        raise BadAnnouncement(f"announcement format {v!r:.20} is not {LAN_FORMAT!r} (another mesh-llm version)")
    mesh_id, node_id = txt.get("mesh", ""), txt.get("node", "")
    if not _hex(mesh_id, 16):
        raise BadAnnouncement("bad mesh id")
    if not _hex(node_id, 32):
        raise BadAnnouncement("bad node id")
    version = txt.get("sw", "")
    if not _printable(version, MAX_VERSION_LEN):
        raise BadAnnouncement("bad software version")
    name = txt.get("name", "")
    if name and not _printable(name, MAX_NAME_LEN):
        raise BadAnnouncement("bad mesh name")
    addrs = []
    for i in range(MAX_DIAL_ADDRS):
        a = txt.get(f"a{i}")
        if a is None:
            break
        if not is_dial_addr(a):
            raise BadAnnouncement(f"address {a[:60]!r} is not host:port")
        addrs.append(a)
    return LanMesh(mesh_id, node_id, version, name, tuple(addrs), _listing(txt))


def lan_interfaces(env: Mapping[str, str] = os.environ) -> list[str] | None:
    """The local addresses to use for mDNS from MESH_LLM_LAN_INTERFACES, or None: all interfaces."""
    text = env.get(INTERFACES_ENV, "").strip()
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise ValueError(f"{INTERFACES_ENV}: {part[:60]!r} is not an IP address of this machine") from None
    return out


def _zeroconf(interfaces: list[str] | None) -> Any:
    from zeroconf import InterfaceChoice, IPVersion
    from zeroconf.asyncio import AsyncZeroconf

    if interfaces is None:
        return AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=interfaces)


class _Watcher:
    """Browses SERVICE_TYPE and resolves what appears, a bounded number at a time."""

    def __init__(self, azc: Any, on_seen: Callable[[LanMesh], None], on_bad: Callable[[str, str], None]) -> None:
        from zeroconf.asyncio import AsyncServiceBrowser

        self.azc = azc
        self.on_seen, self.on_bad = on_seen, on_bad
        self.tasks: set[asyncio.Task[None]] = set()
        self.gate = asyncio.Semaphore(RESOLVING_AT_ONCE)
        self.browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[self._changed])

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed or len(self.tasks) >= MAX_SEEN:
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        async with self.gate:
            try:
                info = AsyncServiceInfo(service_type, name)
                if not await info.async_request(self.azc.zeroconf, RESOLVE_MS):
                    return
                seen = parse_txt(info.properties or {})
            except BadAnnouncement as exc:
                self.on_bad(name, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - whatever a stranger announces ends here
                self.on_bad(name, f"unreadable announcement ({type(exc).__name__})")
                return
        self.on_seen(seen)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.browser.async_cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def browse_lan(timeout: float = 3.0, *, interfaces: list[str] | None = None, skipped: list[str] | None = None) -> list[LanMesh]:
    """Announcements heard on the LAN within `timeout` seconds, one per node (the last heard).
    Records that fail validation are skipped; their reasons go to `skipped` if given."""
    found: dict[str, LanMesh] = {}

    def seen(m: LanMesh) -> None:
        if m.node_id in found or len(found) < MAX_SEEN:
            found[m.node_id] = m

    def bad(name: str, why: str) -> None:
        if skipped is not None and len(skipped) < MAX_SEEN:
            skipped.append(f"{name[:80]}: {why}")

    azc = _zeroconf(interfaces if interfaces is not None else lan_interfaces())
    try:
        watcher = _Watcher(azc, seen, bad)
        try:
            await asyncio.sleep(timeout)
        finally:
            await watcher.close()
    finally:
        await azc.async_close()
    return list(found.values())


async def lan_listings(timeout: float = 3.0, *, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """For discover/--auto: published meshes' listings as announced, private meshes as
    {"private": True, mesh_id, name, node_id, addrs, version} (see the module docstring)."""
    return [m.to_listing() for m in await browse_lan(timeout, skipped=skipped)]


def _host(addr: str) -> str:
    host = addr.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


class LanAnnouncer:
    """Announces a member node's mesh on the LAN and feeds same-mesh announcements to
    `mesh.hint`. One per node: `await start()` after the mesh started, `await close()`."""

    def __init__(self, mesh: Any, *, name: str | None = None, listing: dict[str, Any] | None = None,
                 interfaces: list[str] | None = None, say: Callable[[str], None] = lambda line: None) -> None:
        self.mesh = mesh
        self.name = name
        self.listing = listing
        self.interfaces = interfaces
        self.say = say
        self.azc: Any = None
        self.info: Any = None
        self.watcher: _Watcher | None = None
        self.announced: tuple[str, ...] = ()
        self._refresh: asyncio.Task[None] | None = None

    def _addrs(self) -> tuple[str, ...]:
        with contextlib.suppress(Exception):
            return own_dial_addrs(self.mesh.endpoint.addr().direct_addresses())
        return tuple(self.mesh.me.addrs)

    def _info(self, addrs: tuple[str, ...]) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        node_id = self.mesh.me.id
        listing = self.listing
        try:
            txt = encode_txt(mesh_id=self.mesh.creds.mesh_id.hex(), node_id=node_id, addrs=addrs, name=self.name, listing=listing)
        except ValueError as exc:
            self.say(f"LAN announcement without the public listing: {exc}")
            txt = encode_txt(mesh_id=self.mesh.creds.mesh_id.hex(), node_id=node_id, addrs=addrs, name=self.name)
        hosts = sorted({_host(a) for a in addrs if not _host(a).startswith(("127.", "::1"))})
        port = int(addrs[0].rpartition(":")[2]) if addrs else 0
        label = f"mesh-llm-{node_id[:16]}"
        return AsyncServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port, properties=txt,
                                server=f"{label}.local.", parsed_addresses=hosts or None)

    async def start(self) -> None:
        """Announce and watch; a LAN that cannot carry mDNS costs one line, never the node."""
        interfaces = self.interfaces if self.interfaces is not None else lan_interfaces()
        try:
            self.azc = _zeroconf(interfaces)
            self.announced = self._addrs()
            self.info = self._info(self.announced)
            await self.azc.async_register_service(self.info)  # the name is the node's: unique
            self.watcher = _Watcher(self.azc, self._seen, lambda name, why: None)
        except Exception as exc:  # noqa: BLE001 - the LAN is a convenience: the node runs on without it
            self.say(f"LAN announcement failed ({type(exc).__name__}: {exc}); peers on this LAN will not see this node (--no-lan hides this)")
            await self.close()
            return
        self._refresh = asyncio.ensure_future(self._refresh_loop())

    def _seen(self, m: LanMesh) -> None:
        if m.mesh_id != self.mesh.creds.mesh_id.hex() or m.node_id == self.mesh.me.id:
            return
        if self.mesh.hint(m.node_id, m.addrs):
            self.say(f"LAN: {m.node_id[:8]} of this mesh announces {', '.join(m.addrs)}: dialing it there")

    async def update(self, *, listing: dict[str, Any] | None = None, name: str | None = None) -> None:
        """Announce a new listing (or name); unchanged ones are not sent again."""
        name = name if name is not None else self.name
        if (listing, name) == (self.listing, self.name):
            return
        self.listing, self.name = listing, name
        await self._reannounce()

    async def announce_listing(self, listing: Any) -> None:
        """The publisher's hook: each round's public listing (a `Listing`, None when delisted),
        announced on the LAN exactly as the relays get it."""
        await self.update(listing=json.loads(listing.encode()) if listing is not None else None)

    async def _reannounce(self) -> None:
        if self.azc is None:
            return
        self.announced = self._addrs()
        self.info = self._info(self.announced)
        with contextlib.suppress(Exception):
            await self.azc.async_update_service(self.info)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECS)
            if self._addrs() != self.announced:
                await self._reannounce()

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self.watcher is not None:
            await self.watcher.close()
        if self.azc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.azc.async_unregister_all_services(), 3)
            with contextlib.suppress(Exception):
                await self.azc.async_close()
            self.azc = None
