"""The pure bounds on what peers may send and make a node do: addresses, names, frame
budgets, nesting depth, member cap, hinted-dial rate, refusal log rate, text shown."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from mesh_llm.mesh.admission import LogLimiter
from mesh_llm.mesh.peers import (
    MAX_ALIASES,
    MAX_CLIENTS,
    MAX_DEMAND,
    MAX_DIAL_ADDRS,
    MAX_HOSTED,
    MAX_MEMBERS,
    MAX_MODELS_ON_DISK,
    MAX_NAME_LEN,
    MAX_ON_DEMAND,
    MAX_PEERS_PER_FRAME,
    MAX_REQUESTS,
    MAX_UNIX_TIME,
    REDIAL_BACKOFF_SECS,
    DemandEntry,
    DialHint,
    DialLimiter,
    HostedModel,
    Membership,
    OnDemand,
    PeerRecord,
    as_client,
    decode_gossip,
    encode_gossip,
    encoded_size,
    experts_mask,
    is_dial_addr,
    is_relay_url,
    order_of,
    own_dial_addrs,
    rank_hints,
    wire_order,
)
from mesh_llm.mesh.wire import MAX_DEPTH, MAX_FRAME, FrameDecoder, ProtocolError, encode_frame, nesting_exceeds
from mesh_llm.text import for_markup, is_name, printable, terminal_safe


def pid(i: int) -> str:
    return f"{i:064x}"


@pytest.mark.parametrize("good", ["127.0.0.1:1", "10.0.0.2:65535", "[::1]:4000", "[fe80::1%2]:9", "relay-1.example.org:443", "host.:80", "a:7"])
def test_dial_addresses_that_peers_may_send(good: str) -> None:
    assert is_dial_addr(good)


@pytest.mark.parametrize("bad", [
    "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "1.2.3.999:5", "::1:5", "[::1]", "[zz::1]:5", "[1.2.3.4]:5",
    "ex_ample.org:5", "-bad.org:5", "a..b:5", "exämple.org:5", "host:5\x1b", "host: 5", ":5", "h" * 200 + ":5", "host:+5", "host:٥",
])
def test_dial_addresses_that_are_refused(bad: str) -> None:
    assert not is_dial_addr(bad)


def test_relay_urls() -> None:
    assert is_relay_url("") and is_relay_url("https://euw1-1.relay.iroh.network./") and is_relay_url("http://10.0.0.1:3340")
    for bad in ("ftp://relay.org/", "https://", "relay.org", "https://relay.org/" + "x" * 256, "https://rélay.org/", "https://relay.org/\x1b[2J", "https://a b/"):
        assert not is_relay_url(bad), bad


def record_doc(**fields: object) -> dict:
    return {**PeerRecord(id=pid(1)).to_wire(), **fields}


@pytest.mark.parametrize("fields", [
    {"addrs": [f"10.0.0.{i}:4000" for i in range(MAX_DIAL_ADDRS + 1)]},
    {"addrs": ["10.0.0.1:4000", "𝔵" * 60]},
    {"addrs": ["not an address"]},
    {"relay": "https://relay.org/" + "x" * 300},
    {"relay": "javascript:alert(1)"},
    {"hostname": "box\x1b[31m"},
    {"hostname": "line\nbreak"},
    {"hostname": "h" * 256},
    {"version": "1.0\x07"},
    {"devices": ["CUDA0\x1b]0;pwned\x07"]},
    {"models_on_disk": ["ok", ""]},
    {"lending": ["\x9b2J"]},  # a C1 control: CSI on some terminals
    {"hosting": [{"name": "m\u202e", "state": "ready"}]},  # bidi override: text that lies about itself
    {"hosting": [{"name": "m", "state": "ready", "draft": "d\x1b"}]},
    {"hosting": [{"name": "m", "state": "ready", "experts": 513, "experts_used": 2}]},  # more than llama.cpp loads
    {"hosting": [{"name": "m", "state": "ready", "experts": 8, "experts_used": -1}]},
    {"hosting": [{"name": "m", "state": "ready", "experts": "8"}]},
    {"hosting": [{"name": "m", "state": "ready", "experts": 4, "experts_used": 5}]},  # more used than there are
])
def test_records_with_oversize_or_unprintable_fields_are_refused(fields: dict) -> None:
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record_doc(**fields))
    hint = {"id": pid(1), "role": "host", "addrs": fields.get("addrs", []), "relay": fields.get("relay", "")}
    if "addrs" in fields or "relay" in fields:  # hints carry the same checks
        with pytest.raises(ProtocolError):
            DialHint.from_wire(hint)


def test_printable_names_of_any_script_pass_and_free_text_is_cleaned() -> None:
    doc = record_doc(hostname="[bold]ラボ-1[/]", devices=["CUDA0"], addrs=["[::1]:5", "10.0.0.1:5"], relay="https://r.example/",
                     hosting=[{"name": "[/x]", "state": "error", "detail": "failed:\nline two\x1b[2J"}])
    rec = PeerRecord.from_wire(doc)
    assert rec.hostname == "[bold]ラボ-1[/]" and rec.hosting[0].name == "[/x]"  # markup is text: escaped on output, not refused
    assert rec.hosting[0].detail == "failed: line two[2J"


def bloated(i: int) -> PeerRecord:
    """What a throw-away identity sent before the bounds: dozens of addresses that JSON escapes twelvefold."""
    return PeerRecord(id=pid(i), role="host", addrs=tuple("𝔵" * 64 for _ in range(32)), relay="𝔵" * 256)


def test_an_honest_frame_stays_under_the_limit_however_many_and_big_the_members() -> None:
    me = PeerRecord(id=pid(0), hostname="me", addrs=("10.0.0.1:4000",))
    honest = [PeerRecord(id=pid(i), addrs=("10.0.0.2:4000",)) for i in range(1, 4)]
    known = [*honest, *(bloated(i) for i in range(100, 140))]  # 40 bloated identities: 1.1 MB of hints
    assert sum(encoded_size(DialHint.of(k).to_wire()) for k in known) > MAX_FRAME  # the attack would work without the budget
    frame = encode_frame(encode_gossip(me, known))
    assert len(frame) <= MAX_FRAME
    doc = json.loads(frame[4:])
    assert doc["self"]["id"] == me.id and [h["id"] for h in doc["peers"][:3]] == [h.id for h in honest]
    # valid members, as many as a frame names and each as big as allowed: all fit, and decode
    largest = [PeerRecord(id=pid(i), role="host", addrs=tuple(f"{'h' * 60}.{'g' * 60}:{i % 65535 + 1}" for _ in range(MAX_DIAL_ADDRS)),
                          relay="https://" + "r" * 240 + ".org/") for i in range(1000)]
    frame = encode_frame(encode_gossip(me, largest))
    record, hints = decode_gossip(json.loads(frame[4:]))
    assert record == me and len(hints) == MAX_PEERS_PER_FRAME


def test_the_gossip_budget_keeps_our_record_and_drops_hints_past_it() -> None:
    me = PeerRecord(id=pid(0))
    known = [PeerRecord(id=pid(i), addrs=("10.0.0.2:4000",)) for i in range(1, 50)]
    budget = encoded_size(encode_gossip(me, [])) + 10 * (encoded_size(DialHint.of(known[0]).to_wire()) + 1)
    doc = encode_gossip(me, known, budget=budget)
    assert encoded_size(doc) <= budget and len(doc["peers"]) == 10 and doc["self"] == me.to_wire()


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


def test_frames_nested_too_deep_are_protocol_errors_not_recursion() -> None:
    assert not nesting_exceeds(nested(MAX_DEPTH)) and nesting_exceeds(nested(MAX_DEPTH + 1))
    assert not nesting_exceeds(b'{"s":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{"}')  # brackets in strings
    assert nesting_exceeds(b"[[]," * 40 + b"[]" + b"]" * 40)  # deep without a run of openers
    assert nesting_exceeds(b"[" * 100_000 + b"]" * 100_000)  # past json's own recursion limit
    for payload in (nested(MAX_DEPTH + 1), b"[" * 200_000 + b"]" * 200_000, b"[" * 500_000):
        dec = FrameDecoder()
        dec.feed(struct.pack(">I", len(payload)) + payload)
        with pytest.raises(ProtocolError):
            dec.next_frame()
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", len(nested(MAX_DEPTH))) + nested(MAX_DEPTH))
    assert dec.next_frame() is not None


def test_membership_is_capped_and_a_full_node_dials_nobody_new() -> None:
    ms = Membership(self_id=pid(0))
    for i in range(1, MAX_MEMBERS + 1):
        assert ms.has_room_for(pid(i))
        ms.admit(PeerRecord(id=pid(i)), 0.0)
    assert not ms.has_room_for(pid(10_000)) and ms.has_room_for(pid(1))  # a member reconnecting still fits
    assert ms.to_dial([DialHint(pid(10_000), addrs=("10.0.0.1:5",))], 0.0) == []
    ms.remove(pid(1), "left")
    assert [h.id for h in ms.to_dial([DialHint(pid(10_000), addrs=("10.0.0.1:5",)), DialHint(pid(10_001), addrs=("10.0.0.1:5",))], 0.0)] == [pid(10_000)]


def test_clients_have_their_own_cap_and_never_take_a_members_place() -> None:
    ms = Membership(self_id=pid(0))
    for i in range(1, MAX_CLIENTS + 1):
        assert ms.has_room_for(pid(i), client=True)
        ms.admit(PeerRecord(id=pid(i), role="client"), 0.0)
    assert not ms.has_room_for(pid(10_000), client=True)  # the clients' pool is full...
    assert ms.has_room_for(pid(10_000))  # ...and members still fit
    assert [h.id for h in ms.to_dial([DialHint(pid(10_001), addrs=("10.0.0.1:5",))], 0.0)] == [pid(10_001)]


def test_dial_failures_of_throw_away_ids_do_not_pile_up() -> None:
    ms = Membership(self_id=pid(0))
    for i in range(1, 1000):
        ms.note_dial_failure(pid(i), 0.0)
    ms.to_dial([], REDIAL_BACKOFF_SECS + 1)
    assert ms.dial_failed_at == {}


def test_hints_more_members_vouch_for_come_first_and_no_source_crowds_out_another() -> None:
    flood = [DialHint(pid(1000 + i), addrs=("10.9.9.9:5",)) for i in range(200)]
    honest = DialHint(pid(7), addrs=("10.0.0.7:5",))
    other = DialHint(pid(8), addrs=("10.0.0.8:5",))
    ranked = rank_hints({pid(1): flood, pid(2): [other, honest], pid(3): [honest]})
    assert ranked[0] == honest and set(ranked[1:3]) == {other, flood[0]}  # each source's first hint before anyone's second
    assert len(ranked) == 202 and len({h.id for h in ranked}) == 202


def test_hinted_dials_are_capped_in_flight_and_in_rate() -> None:
    lim = DialLimiter(at_once=2, per_sec=2.0, burst=4)
    assert [lim.try_start(0.0) for _ in range(3)] == [True, True, False]  # the in-flight cap
    lim.finished()
    lim.finished()
    assert [lim.try_start(0.0) for _ in range(3)] == [True, True, False]  # the rest of the burst
    lim.finished()
    lim.finished()
    assert not lim.try_start(0.1)  # none in flight, but the bucket is empty
    assert lim.try_start(0.6) and not lim.try_start(0.6)  # two per second
    started = sum(lim.try_start(t / 10) or (lim.finished() or False) for t in range(10, 110))  # 10 s of asking every 0.1 s
    assert started <= 2 * 10 + 4


def test_refusal_lines_are_rate_limited_per_kind_with_a_count() -> None:
    log = LogLimiter(every=10.0)
    assert log.line("busy", "Refused", 0.0) == "Refused"
    assert all(log.line("busy", "Refused", t) is None for t in (1.0, 2.0, 9.9))
    assert log.line("refused", "Wrong secret", 5.0) == "Wrong secret"  # another kind has its own allowance
    line = log.line("busy", "Refused", 10.0)
    assert line is not None and "3 more" in line
    assert log.line("busy", "Refused", 25.0) == "Refused"
    few = LogLimiter(every=10.0, max_kinds=2)
    assert few.line("a", "A", 0.0) == "A" and few.line("b", "B", 0.0) == "B"
    assert few.line("v1", "V1", 0.0) == "V1" and few.line("v2", "V2", 0.0) is None  # new kinds past the cap share one allowance
    assert len(few._last) == 3


def test_text_from_elsewhere_is_shown_without_controls_and_markup_stays_literal() -> None:
    evil = "[bold]x[/]\x1b[31mred\x1b]0;title\x07\u202e\r\nend"
    assert printable(evil) == "[bold]x[/][31mred]0;title  end"
    assert terminal_safe("a\x1b[2Jb\nc\x07") == "a[2Jb\nc"
    assert printable("x" * 300, 10) == "x" * 9 + "…"
    console = Console(record=True, width=200, color_system=None)
    console.print(f"[green]serving {for_markup('[/x]')} and {for_markup('[red]x[/]')}[/]")
    assert console.export_text().strip() == "serving [/x] and [red]x[/]"
    assert is_name("[/x]", 10) and not is_name("", 10) and not is_name("a\x1b", 10) and not is_name("x" * 11, 10)


def test_a_node_advertises_only_addresses_its_peers_accept() -> None:
    many = [f"10.0.0.{i}:4000" for i in range(20)]
    assert own_dial_addrs(["[::1]:5", "bogus", *many]) == tuple(many[:MAX_DIAL_ADDRS])
    rec = PeerRecord(id=pid(1), addrs=own_dial_addrs(["[::1]:5", *many]), hosting=(HostedModel("m", "ready"),))
    assert PeerRecord.from_wire(json.loads(json.dumps(rec.to_wire()))) == rec


def test_no_frame_can_make_decoding_take_long() -> None:
    # Patterns over raw bytes can be driven quadratic (an unclosed string of escaped quotes took
    # minutes per MiB). Decode such frames in a child with a bound a thousand times what they
    # take (milliseconds): a quadratic decoder would take hours, not fail by a hair.
    code = textwrap.dedent("""
        from mesh_llm.mesh.wire import MAX_FRAME, ProtocolError, decode_payload
        for payload in (b'"' + b'\\\\"' * (MAX_FRAME // 2 - 1), b'{"a":"' + b'\\\\' * (MAX_FRAME - 8) + b'"}', b'[' * MAX_FRAME, b'{"a":[' * (MAX_FRAME // 6)):
            try:
                decode_payload(payload)
            except ProtocolError:
                pass
        print("done")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "done", out.stderr


# -- the demand map's fields: bounded like the rest, optional on the wire ---------------

DEMAND = {"model": "tiny-1", "requests": 3, "last_active": 1.7e9}
ON_DEMAND = {"name": "tiny-1", "fingerprint": "ab" * 16, "need_bytes": 10**8, "aliases": ["tiny"]}


@pytest.mark.parametrize("fields", [
    {"demand": [DEMAND] * 2},  # one model twice
    {"demand": [{**DEMAND, "model": f"m{i}"} for i in range(MAX_DEMAND + 1)]},
    {"demand": [{**DEMAND, "model": "m\x1b[2J"}]},
    {"demand": [{**DEMAND, "model": ""}]},
    {"demand": [{**DEMAND, "model": "m" * (MAX_NAME_LEN + 1)}]},
    {"demand": [{**DEMAND, "requests": -1}]},
    {"demand": [{**DEMAND, "requests": MAX_REQUESTS + 1}]},
    {"demand": [{**DEMAND, "requests": True}]},
    {"demand": [{**DEMAND, "last_active": "now"}]},
    {"demand": [{**DEMAND, "last_active": 1e300}]},
    {"demand": ["tiny-1"]},
    {"demand": {"tiny-1": 3}},
    {"on_demand": [ON_DEMAND] * 2},
    {"on_demand": [{**ON_DEMAND, "name": f"m{i}"} for i in range(MAX_ON_DEMAND + 1)]},
    {"on_demand": [{**ON_DEMAND, "name": "m\u202e"}]},
    {"on_demand": [{**ON_DEMAND, "name": ""}]},
    {"on_demand": [{**ON_DEMAND, "fingerprint": "f" * 65}]},
    {"on_demand": [{**ON_DEMAND, "need_bytes": -5}]},
    {"on_demand": [{**ON_DEMAND, "aliases": ["a\x07"]}]},
    {"on_demand": [{**ON_DEMAND, "aliases": [f"a{i}" for i in range(MAX_ALIASES + 1)]}]},
])
def test_demand_and_on_demand_fields_out_of_bounds_are_refused(fields: dict) -> None:
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record_doc(**fields))


def test_demand_fields_round_trip_and_are_optional() -> None:
    rec = PeerRecord(id=pid(1), demand=(DemandEntry("tiny-1", 3, 1.7e9),), on_demand=(OnDemand("tiny-1", "ab" * 16, 10**8, ("tiny",)),))
    assert PeerRecord.from_wire(json.loads(json.dumps(rec.to_wire()))) == rec
    old = {k: v for k, v in record_doc().items() if k not in ("demand", "on_demand")}  # a peer from before the demand map
    assert PeerRecord.from_wire(old).demand == () and PeerRecord.from_wire(old).on_demand == ()


def test_a_client_keeps_its_demand_but_claims_no_files_on_demand() -> None:
    rec = PeerRecord(id=pid(1), role="standby", free_bytes=10**12, demand=(DemandEntry("m", 3, 1.7e9),), on_demand=(OnDemand("m", "", 1),))
    coerced = as_client(rec)
    assert coerced.role == "client" and coerced.demand == rec.demand and coerced.on_demand == () and coerced.free_bytes == 0


def test_a_record_with_every_name_field_at_its_bound_still_fits_a_frame() -> None:
    big = "𝔵" * MAX_NAME_LEN  # JSON escapes it twelvefold
    names = tuple(f"{i}{big}"[:MAX_NAME_LEN] for i in range(MAX_MODELS_ON_DISK))
    hosted = tuple(HostedModel(n, "ready", aliases=names[:MAX_ALIASES], experts=512, experts_used=8, shard="f" * 128) for n in names[:MAX_HOSTED])
    me = PeerRecord(id=pid(0), models_on_disk=names, fingerprints=("f" * 64,) * len(names), rankings=(wire_order(range(511, -1, -1)),) * len(names),
                    lending=names, hosting=hosted, demand=tuple(DemandEntry(f"{i}{big}"[:MAX_NAME_LEN], MAX_REQUESTS, MAX_UNIX_TIME) for i in range(MAX_DEMAND)),
                    on_demand=tuple(OnDemand(f"{i}{big}"[:MAX_NAME_LEN], "f" * 64, 2**62, tuple(f"{j}{big}"[:MAX_NAME_LEN] for j in range(MAX_ALIASES)))
                                    for i in range(MAX_ON_DEMAND)))
    frame = encode_frame(encode_gossip(me, []))
    assert len(frame) <= MAX_FRAME
    assert decode_gossip(json.loads(frame[4:]))[0] == me


MOE = {"name": "m", "state": "ready", "experts": 8, "experts_used": 2}


@pytest.mark.parametrize("fields", [
    {"hosting": [{**MOE, "shard": "1ff"}]},  # expert 8 of a model with 8 (0–7)
    {"hosting": [{**MOE, "expert_groups": 9}]},  # more groups than experts
    {"hosting": [{**MOE, "shard": "0"}]},  # a shard of no experts
    {"hosting": [{**MOE, "shard": "FF"}]},
    {"hosting": [{**MOE, "shard": "-1"}]},
    {"hosting": [{**MOE, "shard": "f" * 129, "experts": 512}]},
    {"hosting": [{**MOE, "experts": 0, "experts_used": 0, "shard": "1"}]},  # a dense model has no experts to shard
    {"models_on_disk": ["m"], "rankings": ["0010"]},  # not three digits per expert
    {"models_on_disk": ["m"], "rankings": ["x"]},
    {"models_on_disk": ["m"], "rankings": ["000000"]},  # expert 0 twice
    {"models_on_disk": ["m"], "rankings": ["001002"]},  # no expert 0
    {"models_on_disk": ["m"], "rankings": ["00G"]},
    {"models_on_disk": ["m"], "rankings": ["".join(f"{e:03x}" for e in range(513))]},  # more than llama.cpp's 512
    {"rankings": ["000"] * 65},
])
def test_shard_and_ranking_fields_out_of_bounds_are_refused(fields: dict) -> None:
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record_doc(**fields))


def test_a_shard_round_trips_as_the_experts_it_keeps() -> None:
    rec = PeerRecord(id=pid(1), models_on_disk=("m", "n", "o"), rankings=(wire_order((2, 0, 1)), "s", ""),
                     hosting=(HostedModel("m", "ready", experts=8, experts_used=2, shard=experts_mask((0, 1, 2, 5, 7))),))
    back = PeerRecord.from_wire(json.loads(json.dumps(rec.to_wire())))
    assert back == rec and back.hosting[0].shard_experts == (0, 1, 2, 5, 7) and order_of(back.rankings[0]) == (2, 0, 1)
    old = {k: v for k, v in record_doc().items() if k != "rankings"}  # a peer from before expert shards
    assert PeerRecord.from_wire(old).rankings == ()
