"""Wire format (pure codecs plus one small reader over an iroh stream).

Every QUIC stream a node opens starts with one byte naming its kind, then
length-prefixed frames: a 4-byte big-endian length and a UTF-8 JSON object.
Tunnel streams carry one header frame and then raw bytes. Frames larger than
MAX_FRAME, bad JSON or a non-object are protocol errors: the reader closes
that stream only.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any, Protocol

ALPN = b"mesh-llm-py"
PROTOCOL_VERSION = 3  # 2: several models per node; 3: member and client admission
MAX_FRAME = 1 << 20  # 1 MiB: a gossip frame for a large mesh is a few tens of KiB
MAX_DEPTH = 32  # nesting of arrays/objects in one frame; ours nest 4 deep
_LEN = struct.Struct(">I")


class StreamKind(IntEnum):
    HELLO = 1  # admission handshake, the only kind allowed before it completes
    GOSSIP = 2  # one frame each way: peer records
    HTTP = 3  # header {model}, then raw HTTP/1.1 bytes to that model's llama-server
    RPC = 4  # header {model}, then raw bytes to the node's loopback rpc-server for that model
    PROVE = 5  # header {model, nonce, ranges}; one frame back: {hash} or {error} (mesh/file_proof.py)
    BLACKBOARD = 6  # header {op: sync, ids} or {op: post, items}; frames back (blackboard/keeper.py)


class ProtocolError(Exception):
    """The peer sent something this node cannot accept; close the stream."""


def encode_frame(doc: dict[str, Any]) -> bytes:
    payload = json.dumps(doc, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(payload)) + payload


def stream_prefix(kind: StreamKind, header: dict[str, Any]) -> bytes:
    return bytes([kind]) + encode_frame(header)


def parse_kind(byte: int) -> StreamKind:
    try:
        return StreamKind(byte)
    except ValueError:
        raise ProtocolError(f"unknown stream kind {byte}") from None


def depth_exceeds(doc: Any, max_depth: int = MAX_DEPTH) -> bool:
    """Whether a decoded document nests arrays/objects deeper than `max_depth` (iterative:
    no recursion, and each value is visited once)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def nesting_exceeds(payload: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether a JSON document nests deeper than `max_depth`. json's C parser guards its own
    recursion (RecursionError past about a thousand levels, in linear time), so parse first
    and measure after; no pattern over the raw bytes (those can be made to take quadratic time)."""
    try:
        return depth_exceeds(json.loads(payload), max_depth)
    except RecursionError:
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def decode_payload(payload: bytes) -> dict[str, Any]:
    """One frame's JSON object; anything else (bad JSON, too deep, not an object) is a ProtocolError."""
    try:
        doc = json.loads(payload)
    except RecursionError:
        raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("frame is not valid JSON") from None
    if depth_exceeds(doc):
        raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
    if not isinstance(doc, dict):
        raise ProtocolError("frame is not a JSON object")
    return doc


class FrameDecoder:
    """Sans-I/O decoder: feed bytes in, take whole frames out."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if size > self.max_frame:
            raise ProtocolError(f"frame of {size} bytes exceeds the {self.max_frame}-byte limit")
        if len(self._buf) < 4 + size:
            return None
        payload = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        return decode_payload(payload)

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


class _Recv(Protocol):
    async def read(self, size_limit: int) -> bytes: ...


class FramedReader:
    """Reads the kind byte and frames from an iroh RecvStream, keeping what follows."""

    CHUNK = 64 * 1024

    def __init__(self, recv: _Recv, max_frame: int = MAX_FRAME) -> None:
        self.recv = recv
        self.decoder = FrameDecoder(max_frame)

    async def _more(self) -> None:
        data = await self.recv.read(self.CHUNK)
        if not data:
            raise ProtocolError("stream ended mid-message")
        self.decoder.feed(data)

    async def read_kind(self) -> StreamKind:
        data = await self.recv.read(self.CHUNK)
        if not data:
            raise ProtocolError("stream ended before its kind byte")
        self.decoder.feed(data[1:])
        return parse_kind(data[0])

    async def read_frame(self) -> dict[str, Any]:
        while (doc := self.decoder.next_frame()) is None:
            await self._more()
        return doc

    def leftover(self) -> bytes:
        """Raw bytes that arrived behind the last frame (tunnel payload)."""
        return self.decoder.take_buffered()


# -- message field helpers: a malformed field is a ProtocolError, never a KeyError ---------


def get_str(doc: dict[str, Any], name: str, max_len: int = 256, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"field {name!r} must be a string of at most {max_len} characters")
    return value


def get_int(doc: dict[str, Any], name: str, lo: int = 0, hi: int = 2**63, default: int | None = None) -> int:
    value = doc.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field {name!r} must be an integer in [{lo}, {hi}]")
    return value


def get_hex(doc: dict[str, Any], name: str, size: int) -> bytes:
    value = get_str(doc, name, 2 * size)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ProtocolError(f"field {name!r} must be {size} bytes of hex")
    return raw


def get_str_list(doc: dict[str, Any], name: str, max_items: int = 64, max_len: int = 256) -> list[str]:
    value = doc.get(name, [])
    if not isinstance(value, list) or len(value) > max_items or not all(isinstance(v, str) and len(v) <= max_len for v in value):
        raise ProtocolError(f"field {name!r} must be a list of at most {max_items} strings")
    return list(value)


def get_float(doc: dict[str, Any], name: str, lo: float = 0.0, hi: float = 1e12, default: float | None = None) -> float:
    value = doc.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field {name!r} must be a number in [{lo:g}, {hi:g}]")
    return float(value)


def get_bool(doc: dict[str, Any], name: str, default: bool | None = None) -> bool:
    value = doc.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be a boolean")
    return value


def get_list(doc: dict[str, Any], name: str, max_items: int) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list) or len(value) > max_items:
        raise ProtocolError(f"field {name!r} must be a list of at most {max_items} items")
    return value
