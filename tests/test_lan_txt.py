"""LAN announcements (pure): TXT encode/decode, hostile records, the discover interface; and
the mesh's outside-hint hook in process."""

from __future__ import annotations

import json

import pytest

from mesh_llm.discovery.lan import (
    MAX_LISTING_BYTES,
    MAX_TXT_KEYS,
    BadAnnouncement,
    LanMesh,
    encode_txt,
    lan_interfaces,
    parse_txt,
)
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import decode_token
from tests.mesh_helpers import make_mesh, wait_until

MESH = "ab" * 16
NODE = "cd" * 32


def as_bytes(txt: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_a_private_announcement_round_trips_and_carries_no_secret() -> None:
    txt = encode_txt(mesh_id=MESH, node_id=NODE, addrs=["10.0.0.5:4000", "[fe80::1]:4000", "junk"], version="0.9", name="poker-night")
    assert all(len(k) + 1 + len(v) <= 255 for k, v in txt.items())
    assert "secret" not in json.dumps(txt) and "ln" not in txt
    m = parse_txt(as_bytes(txt))
    assert m == LanMesh(MESH, NODE, "0.9", "poker-night", ("10.0.0.5:4000", "[fe80::1]:4000"))
    assert m.listing is None
    assert m.to_listing() == {"private": True, "mesh_id": MESH, "name": "poker-night", "node_id": NODE,
                              "addrs": ["10.0.0.5:4000", "[fe80::1]:4000"], "version": "0.9"}


def test_a_published_listing_is_announced_whole_in_chunks() -> None:
    listing = {"name": "poker-night", "token": "x" * 700, "models": ["a", "b"], "nodes": 3}
    txt = encode_txt(mesh_id=MESH, node_id=NODE, addrs=["10.0.0.5:4000"], listing=listing)
    assert int(txt["ln"]) > 1 and all(len(v) <= 250 for v in txt.values())
    m = parse_txt(as_bytes(txt))
    assert m.listing == listing and m.to_listing() == listing


def test_what_would_not_fit_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError):
        encode_txt(mesh_id=MESH, node_id=NODE, addrs=[], listing={"token": "x" * MAX_LISTING_BYTES})
    with pytest.raises(ValueError):
        encode_txt(mesh_id="zz", node_id=NODE, addrs=[])
    with pytest.raises(ValueError):
        encode_txt(mesh_id=MESH, node_id=NODE, addrs=[], name="a\x1bb")


def good() -> dict[str, str]:
    return encode_txt(mesh_id=MESH, node_id=NODE, addrs=["10.0.0.5:4000"], version="0.9")


@pytest.mark.parametrize("change, why", [
    ({"v": "2"}, "format"),
    ({"v": None}, "format"),
    ({"mesh": "AB" * 16}, "mesh id"),
    ({"mesh": "ab" * 15}, "mesh id"),
    ({"node": "cd" * 31 + "zz"}, "node id"),
    ({"sw": ""}, "version"),
    ({"sw": "x" * 65}, "version"),
    ({"name": "evil\x1b[2J"}, "printable"),
    ({"a0": "10.0.0.5"}, "host:port"),
    ({"a0": "999.1.1.1:4000"}, "host:port"),
    ({"a0": "10.0.0.5:70000"}, "host:port"),
    ({"ln": "2", "l0": "{}"}, "chunk 1"),
    ({"ln": "0"}, "chunk count"),
    ({"ln": "999"}, "chunk count"),
    ({"ln": "1", "l0": "[1, 2]"}, "JSON object"),
    ({"ln": "1", "l0": "{nope"}, "not JSON"),
    ({"name": "x" * 300}, "too long"),
])
def test_hostile_records_are_refused_with_a_reason(change: dict[str, str | None], why: str) -> None:
    txt: dict[str, str | None] = dict(good())
    txt.update(change)
    with pytest.raises(BadAnnouncement, match=why):
        parse_txt({k: v for k, v in txt.items() if v is not None})


def test_hostile_shapes_never_crash() -> None:
    base = as_bytes(good())
    cases: list[object] = [
        {},
        {**base, b"\xff\xfe": b"x"},  # a key that is not ASCII
        {**base, b"name": b"\xc3\x28"},  # invalid UTF-8
        {**base, **{f"k{i}".encode(): b"1" for i in range(MAX_TXT_KEYS)}},  # too many entries
        {**base, 5: b"x"},  # a key of another type
        {**base, b"name": 7},
        [("v", "1")],  # not a mapping
        {**base, b"ln": b"20", **{f"l{i}".encode(): b"[" * 200 for i in range(20)}},  # nesting bomb
    ]
    for props in cases:
        with pytest.raises(BadAnnouncement):
            parse_txt(props)  # type: ignore[arg-type]
    # bare keys (no value) and unknown keys are ignored; keys are case-insensitive
    m = parse_txt({**base, b"flag": None, b"extra": b"whatever", b"NAME": b"Kitchen"})
    assert m.name == "Kitchen" and m.node_id == NODE


def test_more_addresses_than_a_node_dials_are_not_read() -> None:
    txt = good()
    txt.update({f"a{i}": f"10.0.0.{i + 1}:4000" for i in range(12)})
    assert len(parse_txt(txt).addrs) == 8


def test_interfaces_come_from_the_environment() -> None:
    assert lan_interfaces({}) is None
    assert lan_interfaces({"MESH_LLM_LAN_INTERFACES": "10.77.0.1, 192.168.1.2"}) == ["10.77.0.1", "192.168.1.2"]
    with pytest.raises(ValueError, match="not an IP address"):
        lan_interfaces({"MESH_LLM_LAN_INTERFACES": "eth0"})


async def test_hint_redials_a_former_member_at_its_new_address_and_nobody_else() -> None:
    creds = MeshCredentials.generate()
    a, b = make_mesh(creds, name="a"), make_mesh(creds, name="b")
    await a.start()
    await b.start()
    try:
        token = decode_token(a.token())
        await b.join([token])
        await wait_until(lambda: len(a.members()) == 1 and len(b.members()) == 1)
        # strangers' ids, bad addresses, self and connected peers are ignored
        assert not b.hint("ef" * 32, ["127.0.0.1:1"])
        assert not b.hint(a.me.id, ["not an address"])
        assert not b.hint(b.me.id, list(b.me.addrs))
        assert not b.hint(a.me.id, list(a.me.addrs))  # connected already
        # a loses b (as after its address changed): b's hint with a's real address reconnects
        link = b.links[a.me.id]
        link.conn.close(0, b"leaving")
        await wait_until(lambda: a.me.id not in b.links)
        b.join_tokens = []  # no rejoin by token: only the hint can bring it back
        assert b.hint(a.me.id, ["127.0.0.1:9", *a.me.addrs])
        await wait_until(lambda: a.me.id in b.links, timeout=20)
        # the same addresses again while connected: nothing
        assert not b.hint(a.me.id, list(a.me.addrs))
    finally:
        await b.close()
        await a.close()


async def test_hint_retries_the_same_addresses_only_after_the_backoff() -> None:
    creds = MeshCredentials.generate()
    b = make_mesh(creds, name="b")
    await b.start()
    try:
        gone = "ef" * 32
        b._know(gone)
        assert b.hint(gone, ["127.0.0.1:9"])
        await wait_until(lambda: gone not in b._dialing, timeout=20)
        assert not b.hint(gone, ["127.0.0.1:9"])  # same addresses: backed off
        assert b.hint(gone, ["127.0.0.1:10"])  # new addresses: at once
    finally:
        await b.close()


def test_only_members_on_a_reachable_socket_announce() -> None:
    from mesh_llm.mesh.transport import TransportConfig
    from mesh_llm.node import NodeConfig

    assert NodeConfig().announces_on_lan
    assert not NodeConfig(lan=False).announces_on_lan  # --no-lan
    assert not NodeConfig(client=True).announces_on_lan
    assert not NodeConfig(transport=TransportConfig.loopback()).announces_on_lan  # a mesh kept on this machine
