"""The Nostr shell against an in-process relay (nostr-sdk's LocalRelay; no internet): publish,
republish, delist, withdraw, and what discovery skips (forged, malformed, other versions, unreachable)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nostr_sdk as ns
import pytest

from mesh_llm.discovery.listing import KIND, Listing, read_listings
from mesh_llm.discovery.nostr import Publisher, _raw, fetch_listings, listing_event, load_or_create_nostr_keys
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import InviteToken
from tests.mesh_helpers import wait_until

VERSION = "0.1.0"


def make(name: str | None = None, **kw: object) -> Listing:
    creds = MeshCredentials.generate()
    token = InviteToken(creds.for_clients(), b"\x01" * 32, ("127.0.0.1:5000",)).encode()
    return Listing(mesh_id=creds.mesh_id.hex(), token=token, version=VERSION, name=name, total_bytes=10**9, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def relay() -> AsyncIterator[str]:
    r = ns.LocalRelayBuilder().addr("127.0.0.1").build()
    await r.run()
    yield str(await r.url())
    r.shutdown()


async def listed(url: str) -> tuple[list[Listing], dict[str, int]]:
    found, skipped, _ = await fetch_listings([url], VERSION, timeout=3)
    return [f.listing for f in found], skipped


async def test_publish_republish_delist_and_withdraw(relay: str, tmp_path: Path) -> None:
    x = make("poker")
    state = {"listing": x}
    lines: list[str] = []
    p = Publisher(ns.Keys.generate(), [relay], lambda: state["listing"], lines.append, lines.append, interval=0.5)
    p.start()
    await wait_until(lambda: p.publishes >= 2, timeout=20)  # republished
    assert (await listed(relay))[0] == [x]
    state["listing"] = None  # type: ignore[assignment]  # e.g. --max-clients reached
    await wait_until(lambda: p.published is None, timeout=20)
    assert (await listed(relay))[0] == []
    state["listing"] = x
    await wait_until(lambda: p.published is not None, timeout=20)
    assert (await listed(relay))[0] == [x]
    await p.close()  # a clean exit withdraws it
    assert (await listed(relay)) == ([], {})
    assert any("Listed the mesh" in line for line in lines) and any("Delisted" in line for line in lines)


async def test_unreachable_relays_are_one_warning_and_a_count(relay: str) -> None:
    x = make()
    warnings: list[str] = []
    p = Publisher(ns.Keys.generate(), [relay, "ws://127.0.0.1:1"], lambda: x, lambda line: None, warnings.append, interval=0.5)
    p.start()
    await wait_until(lambda: p.publishes >= 3, timeout=30)
    assert len(warnings) == 1 and "unreachable" in warnings[0]
    found, skipped, unreachable = await fetch_listings([relay, "ws://127.0.0.1:1"], VERSION, timeout=3)
    assert [f.listing for f in found] == [x] and skipped == {"unreachable relays": 1} and len(unreachable) == 1
    await p.close()
    found, skipped, unreachable = await fetch_listings(["ws://127.0.0.1:1"], VERSION, timeout=1)
    assert found == [] and skipped == {"unreachable relays": 1}


async def test_malformed_other_version_expired_and_forged_listings_are_skipped_with_counts(relay: str) -> None:
    keys = ns.Keys.generate()
    client = ns.Client()
    await client.add_relay(ns.RelayUrl.parse(relay))
    await client.connect()
    good = make()
    now = time.time()
    other = Listing(**{**make().__dict__, "version": "9.0.0"})
    junk = ns.EventBuilder(ns.Kind(KIND), "{not json").tags([ns.Tag.identifier("x"), ns.Tag.parse(["k", "mesh-llm"])]).finalize(keys)
    stolen = Listing(**{**make().__dict__, "token": good.token})  # another mesh's token under its own id
    for event in (listing_event(keys, good, 60, now), listing_event(ns.Keys.generate(), other, 60, now), junk,
                  listing_event(ns.Keys.generate(), stolen, 60, now), listing_event(ns.Keys.generate(), make(), 2, now)):
        await client.send_event(event)
    # A forged listing: a real one with its content changed, sent straight to the relay.
    forged = json.loads(listing_event(keys, make(), 60, now).as_json())
    forged["content"] = make().encode()
    async with aiohttp.ClientSession() as session, session.ws_connect(relay) as ws:
        await ws.send_str(json.dumps(["EVENT", forged]))
        reply = json.loads((await ws.receive(timeout=5)).data)
    assert reply[0] == "OK" and reply[2] is False  # the relay refuses it; a relay that did not...
    assert read_listings([_raw(ns.Event.from_json(json.dumps(forged)))], now, VERSION) == []  # ...would still be caught here
    await client.shutdown()
    await asyncio.sleep(2.5)  # the short-lived listing has expired (its expiration tag is in the past)
    found, skipped, _ = await fetch_listings([relay], VERSION, timeout=3)
    assert [f.listing for f in found] == [good]
    assert skipped.get("malformed") == 2 and skipped.get("version") == 1 and sum(skipped.values()) - skipped.get("expired", 0) == 3


def test_a_tampered_event_counts_as_forged() -> None:
    event = json.loads(listing_event(ns.Keys.generate(), make(), 60, time.time()).as_json())
    event["content"] = make().encode()
    from mesh_llm.discovery.listing import Skipped

    skipped = Skipped()
    assert read_listings([_raw(ns.Event.from_json(json.dumps(event)))], time.time(), VERSION, skipped) == []
    assert skipped.as_dict() == {"forged": 1}


def test_the_nostr_key_is_kept_private_in_the_state_dir(tmp_path: Path) -> None:
    keys = load_or_create_nostr_keys(tmp_path)
    path = tmp_path / "nostr.nsec"
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().startswith("nsec1")
    assert load_or_create_nostr_keys(tmp_path).public_key().to_hex() == keys.public_key().to_hex()


async def test_a_relay_that_comes_up_later_is_used_then(relay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import mesh_llm.discovery.nostr as shell

    monkeypatch.setattr(shell, "RETRY_ROUNDS", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late_url = f"ws://127.0.0.1:{port}"
    x = make()
    warnings: list[str] = []
    p = Publisher(ns.Keys.generate(), [relay, late_url], lambda: x, lambda line: None, warnings.append, interval=0.3)
    p.start()
    await wait_until(lambda: p.publishes >= 1, timeout=20)
    late = ns.LocalRelayBuilder().addr("127.0.0.1").port(port).build()
    await late.run()
    found: list[Listing] = []
    for _ in range(100):
        found = (await listed(late_url))[0]
        if found:
            break
        await asyncio.sleep(0.2)
    assert found == [x] and sum("unreachable" in w for w in warnings) == 1 and len(warnings) <= 2  # said once, not every round
    await p.close()
    late.shutdown()


async def test_without_relays_each_rounds_listing_still_goes_to_the_lan_and_status_says_so() -> None:
    x = make("lan-only")
    state: dict[str, Listing | None] = {"listing": x}
    told: list[Listing | None] = []

    async def tell(listing: Listing | None) -> None:
        told.append(listing)

    lines: list[str] = []
    p = Publisher(ns.Keys.generate(), None, lambda: state["listing"], lines.append, lines.append, interval=0.5, on_listing=tell)
    p.start()
    await wait_until(lambda: len(told) >= 2, timeout=10)
    assert told[:2] == [x, x] and p.published is None  # no relay was asked
    st = p.state()
    assert st["listed"] is True and st["name"] == "lan-only" and st["relays"] == [] and st["nostr_listed"] is False
    assert st["token_kind"] == "client" and x.token not in json.dumps(st)  # the status shows the kind, never the token
    state["listing"] = None
    await wait_until(lambda: told[-1] is None, timeout=10)
    assert p.state()["listed"] is False and any("Delisted" in line for line in lines)
    state["listing"] = x
    await wait_until(lambda: told[-1] == x, timeout=10)
    await p.close()
    assert told[-1] is None  # a clean exit takes it off the LAN too


async def test_status_counts_the_relays_that_took_the_listing(relay: str) -> None:
    x = make()
    p = Publisher(ns.Keys.generate(), [relay, "ws://127.0.0.1:1"], lambda: x, lambda line: None, lambda line: None, interval=0.5)
    p.start()
    try:
        await wait_until(lambda: p.publishes >= 1, timeout=20)
        st = p.state()
        assert st["nostr_listed"] is True and st["relays_up"] == 1 and len(st["relays"]) == 2 and st["last_published_at"]
    finally:
        await p.close()
