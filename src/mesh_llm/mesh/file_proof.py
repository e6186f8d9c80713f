"""Proof that a peer holds the very same GGUF file as this node (pure, plus one small reader).

A fingerprint in gossip is only a string: anyone can repeat it. Before a host uses
a worker, a worker lends to a host, or a node with the file routes prompts to a
peer, it challenges that peer: a fresh nonce and random byte ranges of its own
copy. The peer answers sha256(nonce, its own node id, the bytes of those ranges
in its copy); the challenger computes the same from its copy with the peer's id
and compares. Without the bytes there is nothing to answer with, and the prover's
id in the hash makes an answer useless to anyone else (a peer without the file
cannot pass a challenge on to an honest node and replay its answer).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_llm.mesh.wire import ProtocolError, get_hex, get_list, get_str
from mesh_llm.text import is_name

RANGES = 8  # a challenge asks for this many ranges ...
RANGE_BYTES = 4096  # ... of this many bytes each
MAX_RANGES = 16  # what an answering node accepts at most
MAX_RANGE_BYTES = 64 * 1024
NONCE_BYTES = 16

Range = tuple[int, int]  # (offset, length)


@dataclass(frozen=True)
class Challenge:
    model: str
    nonce: bytes
    ranges: tuple[Range, ...]

    def to_doc(self) -> dict[str, Any]:
        return {"model": self.model, "nonce": self.nonce.hex(), "ranges": [list(r) for r in self.ranges]}

    @staticmethod
    def from_doc(doc: dict[str, Any]) -> Challenge:
        """The challenge in a request, bounded (at most MAX_RANGES of at most MAX_RANGE_BYTES each)."""
        model = get_str(doc, "model", 256)
        if not is_name(model, 256):  # it is looked up and named in log lines
            raise ProtocolError("the challenged model must be named in printable text")
        nonce = get_hex(doc, "nonce", NONCE_BYTES)
        ranges = []
        for item in get_list(doc, "ranges", MAX_RANGES):
            if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                    or item[0] < 0 or not 0 < item[1] <= MAX_RANGE_BYTES):
                raise ProtocolError(f"field 'ranges' must hold [offset, length] pairs with 0 < length <= {MAX_RANGE_BYTES}")
            ranges.append((item[0], item[1]))
        if not ranges:
            raise ProtocolError("field 'ranges' must not be empty")
        return Challenge(model, nonce, tuple(ranges))


def new_challenge(model: str, file_size: int, count: int = RANGES, size: int = RANGE_BYTES) -> Challenge:
    """A fresh nonce and `count` ranges of `size` bytes at random places in a file of `file_size` bytes."""
    if file_size <= 0:
        raise ValueError("cannot challenge for an empty file")
    size = min(size, file_size)
    ranges = tuple((secrets.randbelow(file_size - size + 1), size) for _ in range(count))
    return Challenge(model, secrets.token_bytes(NONCE_BYTES), ranges)


def out_of_file(ranges: Sequence[Range], file_size: int) -> str | None:
    """Why `ranges` cannot be answered from a file of `file_size` bytes (None: they can)."""
    for offset, length in ranges:
        if offset + length > file_size:
            return f"range {offset}+{length} lies beyond the end of this node's copy ({file_size} bytes)"
    return None


def answer(nonce: bytes, prover: str, chunks: Iterable[bytes]) -> str:
    """sha256 over the nonce, the prover's node id and the bytes of the ranges, in order."""
    digest = hashlib.sha256(nonce)
    digest.update(prover.encode())
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(4, "big"))
        digest.update(chunk)
    return digest.hexdigest()


def read_ranges(path: Path, ranges: Sequence[Range]) -> list[bytes]:
    """The bytes of `ranges` in the file (blocking: call it in a thread)."""
    with path.open("rb") as f:
        out = []
        for offset, length in ranges:
            f.seek(offset)
            out.append(f.read(length))
        return out


def answer_from_file(path: Path, challenge: Challenge, prover: str) -> str:
    """What `prover` must answer to `challenge` if its copy is this file (blocking)."""
    return answer(challenge.nonce, prover, read_ranges(path, challenge.ranges))
