"""Mesh listings (pure): encode/decode with hostile input, scoring, sorting, filters, freshness, versions."""

from __future__ import annotations

import json
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
    narrow,
    read_listings,
    score,
)
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.token import InviteToken

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
        raw(make(), expires=None),  # no expiration tag: still read (relays may strip it)
        raw("{nope"),
        raw(make(), d="11" * 16),  # d tag names another mesh
        RawListing("p", NOW, make().encode(), (("d", "x"), ("expiration", "soon"))),  # an expiration that is no number
        raw(other),
        raw('{"withdrawn": true}'),
    ]
    skipped = Skipped()
    found = read_listings(raws, NOW, "0.2.0", skipped)
    assert [f.listing.mesh_id for f in found][0] == good.mesh_id and len(found) == 2
    assert skipped.as_dict() == {"expired": 1, "forged": 1, "malformed": 3, "version": 1}


def test_the_newest_listing_of_a_mesh_wins() -> None:
    x = make(nodes=1)
    newer = Listing(**{**x.__dict__, "node_count": 4})
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
    assert compatible("0.9.1", "0.1.0") and not compatible("1.0.0", "0.1.0")


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
