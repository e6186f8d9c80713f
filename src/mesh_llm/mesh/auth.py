"""Proof of the mesh secret (pure), bound to both endpoint ids.

The dialer and the acceptor each send a fresh nonce; each side then proves it
knows the secret with an HMAC over both nonces and both TLS-verified endpoint
ids, labelled by its role so one side's proof can never be replayed as the
other's, and by the kind of admission (member or client), each with its own key. The secret itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, side: str, dialer_id: bytes, acceptor_id: bytes, dialer_nonce: bytes, acceptor_nonce: bytes, kind: str = "member") -> bytes:
    """`kind` is the admission asked for (member or client): a proof for one never passes as the other."""
    if side not in ("dialer", "acceptor") or kind not in ("member", "client"):
        raise ValueError(side, kind)
    msg = b"mesh-llm/join/v2|" + kind.encode() + b"|" + side.encode() + b"|" + dialer_id + acceptor_id + dialer_nonce + acceptor_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def check(expected: bytes, given: object) -> bool:
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)
