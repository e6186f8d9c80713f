"""Mesh listings (pure): encode/decode with hostile input, scoring, sorting, filters, freshness, versions."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from mesh_llm.discovery.listing import (
    MAX_CONTENT_CHARS,
    Found,
    Listing,
    ListingError,
    Query,
    RawListing,
    Skipped,
    best_for_auto,
    check_name,
    compatible,
    decode_listing,
    found_json,
    freshness,
    listing_from_status,
    merge_found,
    narrow,
    read_lan,
    read_listings,
    score,
)
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import InviteToken, decode_token

NOW = 1_800_000_000


def make(name: str | None = None, nodes: int = 1, total: int = 8 * 10**9, kind: str = "client", **kw: Any) -> Listing:
    creds = MeshCredentials.generate()
    token = InviteToken(creds if kind == "member" else creds.for_clients(), b"\x01" * 32, ("127.0.0.1:5000",)).encode()
    return Listing(mesh_id=creds.mesh_id.hex(), token=token, version="0.1.0", name=name, node_count=nodes, total_bytes=total,
                   free_bytes=total // 2, token_kind=kind, **kw)


def raw(listing: Listing | str, created: int = NOW - 5, expires: int | None = NOW + 100, d: str | None = None, signed: bool = True,
        publisher: str = "aa" * 32) -> RawListing:
    content = listing if isinstance(listing, str) else listing.encode()
    mesh_id = d if d is not None else (listing.mesh_id if isinstance(listing, Listing) else "00" * 16)
    tags: list[tuple[str, ...]] = [("d", mesh_id), ("k", "mesh-llm")]
    if expires is not None:
        tags.append(("expiration", str(expires)))
    return RawListing(publisher, created, content, tuple(tags), signed)


def test_a_listing_round_trips_and_says_which_token_it_carries() -> None:
    x = make("poker-night", nodes=3, serving=("Qwen3-8B",), wanted=("GLM",), region="eu", client_count=1, max_clients=5)
    back = decode_listing(x.encode())
    assert back == x and back.token_kind == "client"
    assert decode_listing(make(kind="member").encode()).token_kind == "member"


def doc_of(x: Listing) -> dict[str, Any]:
    return dict(json.loads(x.encode()))


HOSTILE: list[tuple[str, Any]] = [
    ("not json", "{"),
    ("array", "[]"),
    ("number", "1"),
    ("huge", "{" + " " * MAX_CONTENT_CHARS + "}"),
    ("deep", "[" * 100_000 + "]" * 100_000),
]


@pytest.mark.parametrize("what,content", HOSTILE)
def test_garbage_content_is_malformed(what: str, content: str) -> None:
    with pytest.raises(ListingError) as err:
        decode_listing(content)
    assert err.value.reason == "malformed", what


@pytest.mark.parametrize("change", [
    {"v": 0}, {"v": "1"}, {"v": True}, {"mesh_id": "xyz"}, {"mesh_id": "AA" * 16}, {"mesh_id": None},
    {"token": 5}, {"token": "garbage"}, {"token": ""}, {"version": ""}, {"version": "1.0\n"}, {"version": "x" * 100}, {"version": 1},
    {"node_count": -1}, {"node_count": 0}, {"node_count": "3"}, {"node_count": True}, {"node_count": 10**9}, {"node_count": 1.5},
    {"total_vram_bytes": -5}, {"total_vram_bytes": 2**70}, {"free_vram_bytes": 10**18}, {"client_count": 99},
    {"max_clients": -1}, {"max_clients": "2"}, {"serving": "m"}, {"serving": [1]}, {"serving": ["x"] * 65}, {"serving": ["a\x1b[31m"]},
    {"serving": [""]}, {"wanted": [None]}, {"serving": ["m" * 201]}, {"name": "evil\x07bell"}, {"name": "n" * 65}, {"name": ""},
    {"name": 7}, {"name": " padded"}, {"region": "r" * 33}, {"region": "\u202eltr"}, {"region": ["eu"]},
])
def test_hostile_fields_are_malformed(change: dict[str, Any]) -> None:
    doc = {**doc_of(make("ok")), **change}
    with pytest.raises(ListingError) as err:
        decode_listing(json.dumps(doc))
    assert err.value.reason == "malformed", change


def test_a_token_of_another_mesh_is_refused() -> None:
    a, b = make(), make()
    with pytest.raises(ListingError, match="another mesh"):
        decode_listing(json.dumps({**doc_of(a), "token": b.token}))


def test_the_token_kind_is_read_from_the_token_not_the_document() -> None:
    doc = {**doc_of(make()), "token_kind": "member"}
    assert decode_listing(json.dumps(doc)).token_kind == "client"


def test_a_newer_format_is_a_version_skip_and_withdrawn_is_not_an_error() -> None:
    with pytest.raises(ListingError) as err:
        decode_listing(json.dumps({**doc_of(make()), "v": 99}))
    assert err.value.reason == "version"
    with pytest.raises(ListingError) as err:
        decode_listing('{"withdrawn": true}')
    assert err.value.reason == "withdrawn"


def test_duplicate_models_collapse_and_missing_optionals_default() -> None:
    doc = doc_of(make(serving=("a",)))
    doc["serving"] = ["a", "a", "b"]
    for key in ("wanted", "client_count", "max_clients", "free_vram_bytes"):
        doc.pop(key)
    x = decode_listing(json.dumps(doc))
    assert x.serving == ("a", "b") and x.wanted == () and x.client_count == 0 and x.max_clients is None


def test_reading_skips_forged_expired_malformed_and_other_versions_with_counts() -> None:
    good, old_major = make(nodes=2), make()
    other = Listing(**{**old_major.__dict__, "version": "7.0.0"})
    raws = [
        raw(good),
        raw(make(), signed=False),  # a bad signature
        raw(make(), expires=NOW - 1),
        raw(make(), expires=None),  # no expiration tag: ours always carry one, so this one never goes away
        raw("{nope"),
        raw(make(), d="11" * 16),  # d tag names another mesh
        RawListing("p", NOW, make().encode(), (("d", "x"), ("expiration", "soon"))),  # an expiration that is no number
        RawListing("p", NOW, make().encode(), (("expiration", "\u00b2"),)),  # "²": a digit to isdigit, not to int()
        raw(make(), created=NOW + 3600, expires=NOW + 3700),  # dated an hour ahead: always "fresh", always the newest
        raw(make(), created=NOW - 5, expires=NOW + 10**8),  # says it stays valid for years
        raw(other),
        raw('{"withdrawn": true}'),
    ]
    skipped = Skipped()
    found = read_listings(raws, NOW, "0.1.0", skipped)
    assert [f.listing.mesh_id for f in found] == [good.mesh_id]
    assert skipped.as_dict() == {"bad times": 2, "expired": 1, "forged": 1, "malformed": 5, "version": 1}


def test_a_token_nested_without_end_is_malformed_not_a_crash() -> None:
    import base64

    doc = json.loads(make().encode())
    doc["token"] = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    skipped = Skipped()
    assert read_listings([raw(json.dumps(doc), d=doc["mesh_id"])], NOW, "0.1.0", skipped) == []
    assert skipped.as_dict() == {"malformed": 1}
    found, _ = read_lan([lan(None, mesh_id=doc["mesh_id"], doc=doc)], NOW, "0.1.0", skipped)
    assert found == [] and skipped.as_dict() == {"malformed": 2}


def test_a_copycat_under_another_meshs_id_cannot_hide_it() -> None:
    """The mesh id is public: a stranger can list it again with a token of their own (their own
    secret, their own node) and a newer date. That listing stands beside the real one, never in its place."""
    real = make("poker", nodes=2)
    creds = MeshCredentials(bytes.fromhex(real.mesh_id), b"\x07" * 32).for_clients()
    fake_token = InviteToken(creds, b"\x09" * 32, ("203.0.113.9:4000",)).encode()
    fake = replace(real, token=fake_token, node_count=50)
    found = read_listings([raw(real, created=NOW - 30), raw(fake, created=NOW - 1, publisher="ee" * 32)], NOW, "0.1.0")
    assert sorted(f.listing.token for f in found) == sorted([real.token, fake_token])
    assert len({f.listing.group for f in found}) == 2
    lan_found, _ = read_lan([lan(fake)], NOW, "0.1.0")
    assert {f.listing.token for f in merge_found(found, lan_found)} == {real.token, fake_token}
    # the same mesh's member and client tokens are one mesh: one replaces the other
    member = make("crew", kind="member")
    as_client = replace(member, token=InviteToken(decode_token(member.token).mesh.for_clients(), b"\x01" * 32, ("127.0.0.1:5000",)).encode())
    one = read_listings([raw(member, created=NOW - 9), raw(as_client, created=NOW - 1)], NOW, "0.1.0")
    assert len(one) == 1 and one[0].listing.token == as_client.token


def test_the_newest_listing_of_a_mesh_wins() -> None:
    x = make(nodes=1)
    newer = replace(x, node_count=4)
    found = read_listings([raw(x, created=NOW - 50), raw(newer, created=NOW - 2, publisher="bb" * 32)], NOW, "0.1.0")
    assert len(found) == 1 and found[0].listing.node_count == 4


def test_sorted_by_nodes_then_memory_full_ones_last() -> None:
    small, big_mem, many, full = make(nodes=1, total=10), make(nodes=1, total=99), make(nodes=3, total=1), make(nodes=9, total=500, client_count=2, max_clients=2)
    found = read_listings([raw(x) for x in (small, full, big_mem, many)], NOW, "0.1.0")
    assert [f.listing for f in found] == [many, big_mem, small, full]


def test_scores_follow_the_original_weights() -> None:
    assert score(make()) == 100 + 300 + 5
    assert score(make("poker")) == 100 + 5
    assert score(make(nodes=20, serving=("a", "b"), wanted=("c",))) == 100 + 300 + 50 + 20 + 15
    assert score(make(client_count=1, max_clients=3)) == 100 + 300 + 2 + 5
    assert score(make(client_count=3, max_clients=3)) < 0


def test_filters_narrow_by_model_region_and_memory() -> None:
    a = make(serving=("Qwen3-8B-Q4_K_M",), region="EU", total=24 * 10**9)
    b = make(wanted=("GLM-4.7-Flash",), region="us", total=8 * 10**9)
    found = [Found(x, "p", NOW) for x in (a, b)]
    assert narrow(found, Query(model="qwen3")) == found[:1]
    assert narrow(found, Query(model="glm")) == found[1:]
    assert narrow(found, Query(model="glm", serving_only=True)) == []
    assert narrow(found, Query(region="eu")) == found[:1]
    assert narrow(found, Query(min_vram_gb=10)) == found[:1]
    assert narrow(found, Query()) == found


def test_auto_picks_unnamed_unless_named_and_needs_a_member_token_to_serve() -> None:
    named = make("Poker-Night", nodes=5)
    unnamed, member = make(nodes=2), make(nodes=1, kind="member")
    full = make(nodes=9, client_count=1, max_clients=1)
    found = [Found(x, "p", NOW) for x in (named, unnamed, member, full)]
    assert best_for_auto(found, Query(), None, need_member=False).listing == unnamed  # type: ignore[union-attr]
    assert best_for_auto(found, Query(), "poker-night", need_member=False).listing == named  # type: ignore[union-attr]
    assert best_for_auto(found, Query(), "poker-night", need_member=True) is None
    assert best_for_auto(found, Query(), None, need_member=True).listing == member  # type: ignore[union-attr]
    assert best_for_auto(found, Query(), "nobody", need_member=False) is None


def test_freshness_and_versions() -> None:
    assert [freshness(NOW - age, NOW) for age in (0, 119, 120, 299, 300, 10**6)] == ["fresh", "fresh", "ok", "ok", "stale", "stale"]
    assert compatible("0.1.9", "0.1.0") and not compatible("0.2.0", "0.1.0") and not compatible("1.0.0", "0.1.0")
    assert compatible("1.4.0", "1.0.2") and not compatible("2.0.0", "1.9.9")  # from 1.0 on, the major alone


def test_names_typed_by_the_user_are_checked() -> None:
    assert check_name("poker-night") == "poker-night"
    for bad in ("", " x", "a\nb", "n" * 65):
        with pytest.raises(ValueError):
            check_name(bad)


def test_a_listing_from_the_status_document() -> None:
    creds = MeshCredentials.generate()
    token = InviteToken(creds.for_clients(), b"\x01" * 32, ("127.0.0.1:5000",)).encode()
    doc = {
        "mesh": {"id": creds.mesh_id.hex()},
        "api": {"models": ["tiny", "bad\x1bname"]},
        "nodes": [{"role": "host", "memory_bytes": 10, "free_bytes": 4}, {"role": "standby", "memory_bytes": 6, "free_bytes": 6},
                  {"role": "client", "memory_bytes": 0, "free_bytes": 0}],
        "demand": {"models": [{"model": "tiny", "servers": 1}, {"model": "wanted-one", "servers": 0}]},
    }
    x = listing_from_status(doc, token=token, version="0.1.0", name="n", region=None, max_clients=3)
    assert (x.serving, x.wanted, x.node_count, x.client_count, x.total_bytes, x.free_bytes) == (("tiny",), ("wanted-one",), 3, 1, 16, 10)
    assert decode_listing(x.encode()) == x
    out = found_json(Found(x, "p", NOW - 130, NOW + 10), NOW)
    assert (out["freshness"], out["age_secs"], out["token_kind"], out["nodes"]) == ("ok", 130, "client", 3)
    member_token = InviteToken(creds, b"\x01" * 32, ("127.0.0.1:5000",)).encode()
    shared = listing_from_status(doc, token=member_token, version="0.1.0", name="n", region=None, max_clients=None)
    assert shared.token_kind == "member" == decode_listing(shared.encode()).token_kind  # what it says is what the token is


def lan(x: Listing | None, mesh_id: str | None = None, node: str = "bb" * 32, name: str = "", version: str = "0.1.0",
        doc: dict[str, Any] | None = None) -> tuple[str, str, str, str, dict[str, Any] | None]:
    """One LAN announcement as read_lan takes it."""
    listing = doc if doc is not None else (json.loads(x.encode()) if x is not None else None)
    return (mesh_id or (x.mesh_id if x is not None else "cc" * 16), node, version, name, listing)


def test_lan_announcements_give_listings_checked_like_a_relays_and_private_meshes_apart() -> None:
    published, other = make("lan-party", nodes=2), make()
    skipped = Skipped()
    forged_doc = json.loads(other.encode())
    found, private = read_lan([
        lan(published), lan(None, mesh_id=published.mesh_id, node="dd" * 32),  # a second member of it, private record
        lan(None, mesh_id="ee" * 16, name="home"), lan(None, mesh_id="ee" * 16, node="ff" * 32),  # a private mesh, two members
        lan(other, mesh_id="12" * 16),  # a listing under another mesh's id than its token's: refused
        lan(None, mesh_id="34" * 16, doc=forged_doc | {"token": "nonsense"}),
        lan(replace(make(), version="9.0.0")),  # another major version
        lan(None, mesh_id="56" * 16, doc={"withdrawn": True}),
    ], NOW, "0.1.0", skipped)
    assert [f.listing for f in found] == [published]
    assert found[0].source == "lan" and found[0].published_at == NOW and found[0].publisher == "lan:" + "bb" * 32
    assert [(p.mesh_id, p.name, p.nodes) for p in private] == [("ee" * 16, "home", 2)]  # the published one is not private
    assert skipped.as_dict() == {"malformed": 2, "version": 1}
    assert freshness(found[0].published_at, NOW) == "fresh"


def test_what_the_lan_says_wins_over_a_relays_copy_and_both_are_named() -> None:
    x, y, z = make("a", nodes=3), make("b", nodes=2), make("c", nodes=1)
    newer = replace(x, node_count=4)
    nostr = [Found(x, "aa" * 32, NOW - 50), Found(y, "aa" * 32, NOW - 10)]
    merged = merge_found(nostr, [Found(newer, "lan:1", NOW, source="lan"), Found(z, "lan:2", NOW, source="lan")])
    assert [(f.listing.name, f.source, f.listing.node_count) for f in merged] == [("a", "nostr+lan", 4), ("b", "nostr", 2), ("c", "lan", 1)]
    assert found_json(merged[0], NOW)["source"] == "nostr+lan"
