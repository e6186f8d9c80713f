"""Property tests over the mesh's pure codecs: tokens, frames, peer records, proofs."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.mesh import auth
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import MAX_ALIASES, MAX_HOSTED, MAX_SLICES, MODEL_STATES, DialHint, HostedModel, PeerRecord, Slice, decode_gossip, encode_gossip
from mesh_llm.mesh.token import InviteToken, TokenError, decode_token
from mesh_llm.mesh.wire import MAX_FRAME, FrameDecoder, ProtocolError, encode_frame

addr = st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4), st.integers(min_value=1, max_value=65535))
# what peers may show people: printable text (str.isprintable: no controls, no separators but space)
printable_text = st.text(st.characters(exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"], include_characters=" "))
name = printable_text.filter(bool)
tokens = st.builds(
    InviteToken,
    st.builds(MeshCredentials, st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32)),
    st.binary(min_size=32, max_size=32),
    st.lists(addr, min_size=1, max_size=5).map(tuple),
    st.one_of(st.none(), st.just("https://relay.example.org./")),
)


@given(tokens)
def test_token_round_trips_and_is_url_safe(tok: InviteToken) -> None:
    text = tok.encode()
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_token(text) == tok
    assert decode_token(f"  {text[:10]}\n{text[10:]} ") == tok  # pasted with line breaks


@given(st.text(max_size=300))
def test_any_text_is_a_token_or_a_token_error(text: str) -> None:
    try:
        decode_token(text)
    except TokenError as exc:
        assert str(exc)


@given(tokens, st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_damaged_tokens_never_crash(tok: InviteToken, pos: int, flip: int) -> None:
    raw = bytearray(tok.encode().encode())
    raw[pos % len(raw)] ^= flip
    try:
        decode_token(raw.decode("latin-1"))
    except TokenError:
        pass


def test_newer_token_version_says_upgrade() -> None:
    import base64

    doc = json.dumps({"v": 9}).encode()
    with pytest.raises(TokenError, match="upgrade"):
        decode_token(base64.urlsafe_b64encode(doc).decode())


frames = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**53), max_value=2**53), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)


@given(st.lists(st.dictionaries(st.text(max_size=8), frames, max_size=5), max_size=5), st.integers(min_value=1, max_value=64))
def test_frames_survive_any_chunking(docs: list[dict], chunk: int) -> None:
    stream = b"".join(encode_frame(d) for d in docs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk])
        while (f := dec.next_frame()) is not None:
            out.append(f)
    assert out == docs


@given(st.binary(max_size=200))
def test_random_bytes_are_frames_or_protocol_errors(data: bytes) -> None:
    dec = FrameDecoder(max_frame=64)
    dec.feed(data)
    try:
        while dec.next_frame() is not None:
            pass
    except ProtocolError:
        pass


def test_oversized_frames_are_refused_before_buffering() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_frame()
    with pytest.raises(ProtocolError):
        encode_frame({"x": "y" * MAX_FRAME})
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", 2) + b"[]")
    with pytest.raises(ProtocolError, match="object"):
        dec.next_frame()


slices = st.builds(
    Slice,
    node=st.binary(min_size=32, max_size=32).map(bytes.hex),
    share=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    first=st.integers(min_value=0, max_value=200),
    last=st.integers(min_value=-1, max_value=200),
    output=st.booleans(),
)
hosted = st.builds(
    HostedModel,
    name=st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=40),
    state=st.sampled_from(MODEL_STATES),
    detail=printable_text.map(lambda t: t[:80]),
    size_bytes=st.integers(min_value=0, max_value=2**45),
    need_bytes=st.integers(min_value=0, max_value=2**45),
    ctx=st.integers(min_value=0, max_value=1 << 20),
    split=st.lists(slices, max_size=4, unique_by=lambda s: s.node).map(tuple),
    aliases=st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=20), max_size=3).map(tuple),
)
records = st.builds(
    PeerRecord,
    id=st.binary(min_size=32, max_size=32).map(bytes.hex),
    role=st.sampled_from(["host", "worker", "client", "standby"]),
    hostname=printable_text.map(lambda t: t[:30]),
    devices=st.lists(name.map(lambda t: t[:10]), max_size=3).map(tuple),
    vram_bytes=st.integers(min_value=0, max_value=2**50),
    free_bytes=st.integers(min_value=0, max_value=2**50),
    models_on_disk=st.lists(name.map(lambda t: t[:20]), max_size=3).map(tuple),
    hosting=st.lists(hosted, max_size=2, unique_by=lambda h: h.name).map(tuple),
    lending=st.lists(name.map(lambda t: t[:20]), max_size=3).map(tuple),
    api_port=st.integers(min_value=0, max_value=65535),
    api_public=st.booleans(),
    addrs=st.lists(addr, max_size=3).map(tuple),
)


@given(records, st.lists(records, max_size=4))
def test_gossip_round_trips(me: PeerRecord, known: list[PeerRecord]) -> None:
    wire = json.loads(json.dumps(encode_gossip(me, known)))
    assert decode_gossip(wire) == (me, [DialHint.of(k) for k in known])  # members travel as dial hints only


@given(st.dictionaries(st.sampled_from(["self", "peers", "id", "role", "vram_bytes", "addrs"]), frames, max_size=4))
def test_malformed_gossip_is_a_protocol_error(doc: dict) -> None:
    try:
        decode_gossip(doc)
    except ProtocolError:
        pass


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_proofs_bind_side_ids_and_secret(secret: bytes, a: bytes, b: bytes) -> None:
    n1, n2 = auth.new_nonce(), auth.new_nonce()
    p = auth.proof(secret, "dialer", a, b, n1, n2)
    assert auth.check(p, auth.proof(secret, "dialer", a, b, n1, n2))
    assert not auth.check(p, auth.proof(secret, "acceptor", a, b, n1, n2))
    assert not auth.check(p, auth.proof(bytes(x ^ 1 for x in secret), "dialer", a, b, n1, n2))
    if a != b:
        assert not auth.check(p, auth.proof(secret, "dialer", b, a, n1, n2))
    assert not auth.check(p, p.hex())


GOOD_SLICE = {"node": "00" * 32, "share": 1, "first": 0, "last": 1, "output": True}


def slices_for(n: int) -> list[dict]:
    return [{**GOOD_SLICE, "node": f"{i:064x}"} for i in range(n)]


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "m", "state": "ready", "split": [{**GOOD_SLICE, "share": float("nan")}]},
        {"name": "m", "state": "ready", "split": [{**GOOD_SLICE, "share": float("inf")}]},
        {"name": "m", "state": "ready", "split": [{**GOOD_SLICE, "share": -1}]},
        {"name": "m", "state": "ready", "split": [{**GOOD_SLICE, "output": "yes"}]},
        {"name": "m", "state": "ready", "split": [{**GOOD_SLICE, "node": "zz"}]},
        {"name": "m", "state": "ready", "split": [GOOD_SLICE, GOOD_SLICE]},  # one node twice
        {"name": "m", "state": "ready", "split": slices_for(MAX_SLICES + 1)},
        {"name": "m", "state": "ready", "need_bytes": -5},
        {"name": "m", "state": "ready", "ctx": 1 << 30},
        {"name": "m" * 300, "state": "ready"},
        {"name": "m\x1b[2J", "state": "ready"},
        {"name": "", "state": "ready"},
        {"name": "m", "state": "ready", "detail": "x" * 600},
        ["not", "an", "object"],
    ],
)
def test_malformed_hosted_models_are_refused(bad: object) -> None:
    record = PeerRecord(id="11" * 32).to_wire()
    record["hosting"] = [bad]
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record)


def test_hosted_model_limits_hold_at_the_edge() -> None:
    record = PeerRecord(id="11" * 32).to_wire()
    record["hosting"] = [{"name": "m", "state": "a-future-state", "split": slices_for(MAX_SLICES)}]
    assert len(PeerRecord.from_wire(record).hosting[0].split) == MAX_SLICES  # newer states pass through
    record["hosting"] = [{"name": f"m{i}", "state": "ready"} for i in range(MAX_HOSTED + 1)]
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record)
    record["hosting"] = [{"name": "m", "state": "ready"}, {"name": "m", "state": "loading"}]
    with pytest.raises(ProtocolError, match="twice"):  # one model, one entry: routing and budgets count on it
        PeerRecord.from_wire(record)
    record["hosting"] = [{"name": "m", "state": "ready", "aliases": ["a"] * (MAX_ALIASES + 1)}]
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record)
    record["hosting"] = [{"name": "m", "state": "ready", "aliases": ["gemma-3-270m", "evil\x1b[2J"]}]
    assert PeerRecord.from_wire(record).hosting[0].aliases == ("gemma-3-270m",)  # names that are no text are dropped
    served = PeerRecord(id="11" * 32, hosting=(HostedModel("a", "ready"), HostedModel("b", "loading"), HostedModel("c", "unloading")))
    assert served.models_served == ("a",)  # derived from hosting: only what answers now


@given(st.dictionaries(st.sampled_from(["name", "state", "detail", "size_bytes", "need_bytes", "ctx", "draft", "split"]), frames, max_size=4),
       st.dictionaries(st.sampled_from(["node", "share", "first", "last", "output"]), frames, max_size=5))
def test_any_hosted_model_entry_decodes_or_is_a_protocol_error(entry: dict, piece: dict) -> None:
    record = PeerRecord(id="11" * 32).to_wire()
    record["hosting"] = [{**entry, "split": [piece]}, entry]
    try:
        PeerRecord.from_wire(record)
    except ProtocolError:
        pass


def test_gossip_stays_small_however_large_the_records() -> None:
    big = tuple(HostedModel(f"model-{i}", "ready", "x" * 500, split=tuple(Slice(f"{j:064x}", 1.0, 0, 1, False) for j in range(MAX_SLICES))) for i in range(MAX_HOSTED))
    known = [PeerRecord(id=f"{i:064x}", hosting=big, addrs=("10.0.0.1:4000",)) for i in range(256)]
    frame = encode_frame(encode_gossip(PeerRecord(id="ff" * 32, hosting=big), known))
    assert len(frame) < MAX_FRAME // 4
    _, hints = decode_gossip(json.loads(frame[4:]))
    assert [h.id for h in hints] == [k.id for k in known] and hints[0].addrs == ("10.0.0.1:4000",)
