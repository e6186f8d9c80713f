"""Nostr relays (thin shell over nostr-sdk): publish this mesh's listing, read everyone's.

The node's Nostr key is its own (not the mesh key): `<state-dir>/nostr.nsec`, mode 0600.
A listing is a replaceable event (kind 31990, `d` = mesh id) republished every 60 s with a
120 s expiration, so a node that dies drops out within two minutes; a clean exit deletes it
(NIP-09) and replaces it with a short-lived "withdrawn" one for relays that ignore deletions.
Relays that cannot be reached cost one warning line, never the node.
$MESH_LLM_NOSTR_REPUBLISH_SECS shortens the interval (the expiry stays twice it), for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import nostr_sdk as ns

from mesh_llm.discovery.listing import (
    APP_TAG,
    DEFAULT_RELAYS,
    EXPIRY_SECS,
    KIND,
    REPUBLISH_SECS,
    Found,
    Listing,
    RawListing,
    Skipped,
    read_listings,
)
from mesh_llm.errors import UserError
from mesh_llm.files import read_private, write_private

NSEC_FILE = "nostr.nsec"
REPUBLISH_ENV = "MESH_LLM_NOSTR_REPUBLISH_SECS"
FETCH_SECS = 5.0
CONNECT_SECS = 5.0
MAX_EVENTS = 500
RETRY_ROUNDS = 10  # unreachable relays are tried again every tenth republish
OUTAGE_WARN_SECS = 600.0  # "no relay took the listing" at most this often


def republish_secs() -> float:
    text = os.environ.get(REPUBLISH_ENV, "")
    try:
        value = float(text) if text else REPUBLISH_SECS
    except ValueError:
        value = REPUBLISH_SECS
    return value if 0.5 <= value <= 3600 else REPUBLISH_SECS


def load_or_create_nostr_keys(state_dir: Path) -> ns.Keys:
    path = state_dir / NSEC_FILE
    text = read_private(path, "Nostr key")
    if text is not None:
        try:
            return ns.Keys.parse(text.strip())
        except ns.NostrSdkError:
            raise UserError(f"Nostr key {path} is corrupt: delete it (a new key makes a new publisher id)") from None
    keys = ns.Keys.generate()
    write_private(path, keys.secret_key().to_bech32() + "\n")
    return keys


def relay_urls(relays: list[str] | tuple[str, ...]) -> list[ns.RelayUrl]:
    """--nostr-relay URLs, each checked (ws:// or wss://), or the defaults."""
    urls = []
    for text in relays or DEFAULT_RELAYS:
        if not text.startswith(("ws://", "wss://")):
            raise UserError(f"--nostr-relay {text[:100]!r} must be a ws:// or wss:// URL")
        try:
            urls.append(ns.RelayUrl.parse(text))
        except ns.NostrSdkError as exc:
            raise UserError(f"--nostr-relay {text[:100]!r} is not a relay URL: {exc}") from None
    return urls


async def _connected_client(urls: list[ns.RelayUrl], client: ns.Client | None = None) -> tuple[ns.Client, list[str]]:
    """A client connected to every relay of `urls` that answers; the others named in the second
    item (and removed again: else every send waits for their acknowledgement in vain).
    It needs no signer: events are signed with our keys before they are sent."""
    client = client or ns.Client()
    for url in urls:
        await client.add_relay(url)
    out = await client.try_connect(timedelta(seconds=CONNECT_SECS))
    for url in out.failed:
        with contextlib.suppress(ns.NostrSdkError):
            await client.remove_relay(url)
    failed = [f"{url} ({reason})" for url, reason in out.failed.items()]
    return client, failed


async def _down(client: ns.Client, urls: list[ns.RelayUrl]) -> list[ns.RelayUrl]:
    present = {str(u) for u in await client.relays()}
    return [u for u in urls if str(u) not in present]


def _raw(event: ns.Event) -> RawListing:
    try:
        signed = bool(event.verify())
    except ns.NostrSdkError:
        signed = False
    return RawListing(publisher=event.author().to_hex(), created_at=int(event.created_at().as_secs()), content=event.content(),
                      tags=tuple(tuple(t.to_vec()) for t in event.tags()), signed=signed)


def listing_filter() -> ns.Filter:
    return ns.Filter().kind(ns.Kind(KIND)).custom_tag(ns.SingleLetterTag.from_byte(ord("k")), APP_TAG).limit(MAX_EVENTS)


async def fetch_listings(relays: list[str] | tuple[str, ...], our_version: str, timeout: float = FETCH_SECS,
                         now: Callable[[], float] = time.time) -> tuple[list[Found], dict[str, int], list[str]]:
    """The meshes listed on `relays` (best first), what was skipped and why (counts), and the
    relays that could not be reached. Never raises for a relay or a listing."""
    urls = relay_urls(relays)
    client, failed = await _connected_client(urls)
    skipped = Skipped()
    try:
        events: list[ns.Event] = []
        if len(failed) < len(urls):
            try:
                events = await client.fetch_events(ns.ReqTarget.auto([listing_filter()]), timedelta(seconds=timeout))
            except ns.NostrSdkError as exc:
                failed.append(f"fetch failed ({exc})")
        found = read_listings((_raw(e) for e in events[:MAX_EVENTS]), now(), our_version, skipped)
    finally:
        with contextlib.suppress(Exception):
            await client.shutdown()
    if failed:
        skipped.add("unreachable relays", len(failed))
    return found, skipped.as_dict(), failed


def listing_event(keys: ns.Keys, listing: Listing, expiry_secs: float, now: float) -> ns.Event:
    expires = ns.Timestamp.from_secs(int(now + expiry_secs))
    tags = [ns.Tag.identifier(listing.mesh_id), ns.Tag.parse(["k", APP_TAG]), ns.Tag.expiration(expires)]
    return ns.EventBuilder(ns.Kind(KIND), listing.encode()).tags(tags).finalize(keys)


def withdrawal_events(keys: ns.Keys, mesh_id: str, event_id: str | None, now: float) -> list[ns.Event]:
    """A NIP-09 deletion of our listing, and a replacement that says withdrawn and expires soon."""
    coordinate = f"{KIND}:{keys.public_key().to_hex()}:{mesh_id}"
    tags = [ns.Tag.parse(["a", coordinate]), ns.Tag.parse(["k", str(KIND)])]
    if event_id:
        tags.append(ns.Tag.parse(["e", event_id]))
    deletion = ns.EventBuilder(ns.Kind(5), "mesh delisted").tags(tags).finalize(keys)
    expires = ns.Timestamp.from_secs(int(now + 10))
    replacement = ns.EventBuilder(ns.Kind(KIND), json.dumps({"withdrawn": True})).tags(
        [ns.Tag.identifier(mesh_id), ns.Tag.parse(["k", APP_TAG]), ns.Tag.expiration(expires)]).custom_created_at(
        ns.Timestamp.from_secs(int(now) + 1)).finalize(keys)
    return [replacement, deletion]


class Publisher:
    """Keeps this mesh listed while the node runs: republishes its listing (from `listing()`,
    None to delist: e.g. --max-clients reached), and withdraws it on close. Each round's listing
    also goes to `on_listing` (the LAN announcer), relays or not; `relays=None`: the LAN only."""

    def __init__(self, keys: ns.Keys, relays: list[str] | tuple[str, ...] | None, listing: Callable[[], Listing | None],
                 say: Callable[[str], None], warn: Callable[[str], None], interval: float | None = None,
                 on_listing: Callable[[Listing | None], Awaitable[None]] | None = None) -> None:
        self.keys = keys
        self.urls = relay_urls(relays) if relays is not None else []
        self.listing = listing
        self.on_listing = on_listing
        self.say, self.warn = say, warn
        self.interval = interval or republish_secs()
        self.expiry = self.interval * (EXPIRY_SECS / REPUBLISH_SECS)
        self.published: tuple[str, str] | None = None  # (mesh id, event id) last listed on the relays
        self.current: Listing | None = None  # the listing of the last round (None: delisted)
        self.listed_at: float | None = None  # when a relay last took it
        self.relays_up = 0
        self.delisted_reason: str | None = None
        self.publishes = 0
        self._client: ns.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self._failing = False
        self._warned_at = -OUTAGE_WARN_SECS

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def state(self) -> dict[str, object]:
        """For /api/status: whether and where the mesh is listed (the token itself is not shown)."""
        x = self.current
        return {
            "listed": x is not None, "name": x.name if x else None, "token_kind": x.token_kind if x else None,
            "relays": [str(u) for u in self.urls], "relays_up": self.relays_up, "nostr_listed": self.published is not None and not self._failing,
            "last_published_at": self.listed_at, "publishes": self.publishes, "interval_secs": self.interval,
            "delisted_reason": self.delisted_reason if x is None else None,
        }

    async def _run(self) -> None:
        if self.urls:
            try:
                self._client, failed = await _connected_client(self.urls)
                self.relays_up = len(self.urls) - len(failed)
                if failed:
                    self._warn_once(f"Nostr: {len(failed)} of {len(self.urls)} relay(s) unreachable: {', '.join(failed)[:300]}")
            except Exception as exc:  # noqa: BLE001 - a relay or SDK hiccup never stops the node (nor the LAN listing)
                self._warn_once(f"Nostr: cannot use the relays ({exc}); the mesh is not listed there")
        rounds = 0
        while True:
            rounds += 1
            try:
                down = await _down(self._client, self.urls) if self._client is not None and rounds % RETRY_ROUNDS == 0 else []
                if down and self._client is not None:  # relays that were unreachable: tried again now and then
                    _, failed = await _connected_client(down, self._client)
                    self.relays_up = len(self.urls) - len(failed)
                await self.publish_once()
            except Exception as exc:  # noqa: BLE001 - a relay or SDK hiccup never stops the node
                self._warn_once(f"Nostr: publishing failed ({exc}); retrying every {self.interval:g} s")
            await asyncio.sleep(self.interval)

    def _warn_once(self, line: str) -> None:
        if not self._warned:
            self._warned = True
            self.warn(line)

    async def _send(self, event: ns.Event) -> bool:
        assert self._client is not None
        out = await self._client.send_event(event, ok_timeout=timedelta(seconds=CONNECT_SECS))
        self.relays_up = len(out.success)
        self._failing = not out.success
        now = time.monotonic()
        if self._failing and now - self._warned_at >= OUTAGE_WARN_SECS:  # an outage is told, a flapping relay not every round
            self._warned_at = now
            self.warn(f"Nostr: no relay took the listing: {'; '.join(f'{u}: {r}' for u, r in out.failed.items())[:300]}; retrying every {self.interval:g} s")
        return bool(out.success)

    async def publish_once(self) -> None:
        listing = self.listing()
        if listing is None and self.current is not None:
            self.say("Delisted the mesh" + (f": {self.delisted_reason}" if self.delisted_reason else ""))
        self.current = listing
        if self.on_listing is not None:
            await self.on_listing(listing)
        if self._client is None:
            return
        if listing is None:
            await self._withdraw()
            return
        event = listing_event(self.keys, listing, self.expiry, time.time())
        if await self._send(event):
            if self.published is None:
                self.say(f"Listed the mesh on Nostr ({len(self.urls)} relay(s); {listing.token_kind} token; republished every {self.interval:g} s)")
            self.published = (listing.mesh_id, event.id().to_hex())
            self.listed_at = time.time()
            self.publishes += 1

    async def _withdraw(self) -> None:
        if self.published is None or self._client is None:
            return
        mesh_id, event_id = self.published
        for event in withdrawal_events(self.keys, mesh_id, event_id, time.time()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.send_event(event), 5)
        self.published = None  # only now: until the withdrawal went out, the listing was up

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        try:
            await self._withdraw()
            if self.on_listing is not None and self.current is not None:
                self.current = None
                with contextlib.suppress(Exception):
                    await self.on_listing(None)
        finally:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.shutdown(), 5)
