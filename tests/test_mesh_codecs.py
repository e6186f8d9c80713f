"""Property tests over the mesh's pure codecs: tokens, frames, peer records, proofs."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.mesh import auth
from mesh_llm.mesh.identity import MeshCredentials
from mesh_llm.mesh.peers import MODEL_STATES, HostedModel, PeerRecord, Slice, decode_gossip, encode_gossip
from mesh_llm.mesh.token import InviteToken, TokenError, decode_token
from mesh_llm.mesh.wire import MAX_FRAME, FrameDecoder, ProtocolError, encode_frame

addr = st.from_regex(r"\A(\d{1,3}\.){3}\d{1,3}:\d{1,5}\Z")
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
    name=st.text(min_size=1, max_size=40),
    state=st.sampled_from(MODEL_STATES),
    detail=st.text(max_size=80),
    size_bytes=st.integers(min_value=0, max_value=2**45),
    need_bytes=st.integers(min_value=0, max_value=2**45),
    ctx=st.integers(min_value=0, max_value=1 << 20),
    split=st.lists(slices, max_size=4).map(tuple),
)
records = st.builds(
    PeerRecord,
    id=st.binary(min_size=32, max_size=32).map(bytes.hex),
    role=st.sampled_from(["host", "worker", "client", "standby"]),
    hostname=st.text(max_size=30),
    devices=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    vram_bytes=st.integers(min_value=0, max_value=2**50),
    models_served=st.lists(st.text(max_size=20), max_size=3).map(tuple),
    hosting=st.lists(hosted, max_size=2).map(tuple),
    api_port=st.integers(min_value=0, max_value=65535),
    api_public=st.booleans(),
    addrs=st.lists(addr, max_size=3).map(tuple),
)


@given(records, st.lists(records, max_size=4))
def test_gossip_round_trips(me: PeerRecord, known: list[PeerRecord]) -> None:
    wire = json.loads(json.dumps(encode_gossip(me, known)))
    assert decode_gossip(wire) == (me, known)


@given(st.dictionaries(st.sampled_from(["self", "peers", "id", "role", "vram_bytes", "addrs", "hosting", "split", "share"]), frames, max_size=4))
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


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "m", "state": "dancing"},
        {"name": "m", "state": "ready", "split": [{"node": "00" * 32, "share": float("nan"), "first": 0, "last": 1, "output": True}]},
        {"name": "m", "state": "ready", "split": [{"node": "00" * 32, "share": 1, "first": 0, "last": 1, "output": "yes"}]},
        {"name": "m", "state": "ready", "split": [{"node": "zz", "share": 1, "first": 0, "last": 1, "output": True}]},
        {"name": "m", "state": "ready", "split": [{}] * 65},
        {"name": "m" * 300, "state": "ready"},
        ["not", "an", "object"],
    ],
)
def test_malformed_hosted_models_are_refused(bad: object) -> None:
    record = PeerRecord(id="11" * 32).to_wire()
    record["hosting"] = [bad]
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(record)
