"""Invite tokens (pure): where to reach one member, and the mesh secret.

A token is base64url (no padding) over a small JSON document, so it survives
shells, URLs and chat apps. `v` is the format version; a newer token gets a
clear "upgrade" error rather than a parse failure. Since v2 a token says its
`kind`: a member token carries the mesh secret, a client token only the
clients' secret (see identity.MeshCredentials). A v1 token is a member token.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from mesh_llm.mesh.identity import KINDS, MeshCredentials

TOKEN_VERSION = 2
MAX_TOKEN_CHARS = 4096
MAX_ADDRS = 32


class TokenError(ValueError):
    """A token that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class InviteToken:
    mesh: MeshCredentials
    endpoint_id: bytes  # 32-byte Ed25519 public key of the member that printed it
    addrs: tuple[str, ...]  # direct "ip:port" addresses
    relay_url: str | None = None

    def encode(self) -> str:
        doc = {
            "v": TOKEN_VERSION,
            "kind": self.mesh.kind,
            "mesh": self.mesh.mesh_id.hex(),
            "secret": self.mesh.secret.hex(),
            "id": self.endpoint_id.hex(),
            "addrs": list(self.addrs),
        }
        if self.relay_url:
            doc["relay"] = self.relay_url
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hex_field(doc: dict, name: str, size: int) -> bytes:
    value = doc.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise TokenError(f"invite token is damaged (bad {name!r}): copy the whole token again")
    return raw


def decode_token(text: str) -> InviteToken:
    text = "".join(text.split())
    garbled = TokenError("invite token is garbled: copy the whole `Invite token:` line from a running member")
    if not text or len(text) > MAX_TOKEN_CHARS:
        raise garbled
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):  # a token from a stranger may nest without end
        raise garbled from None
    if not isinstance(doc, dict):
        raise garbled
    version = doc.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise garbled
    if version > TOKEN_VERSION:
        raise TokenError(f"invite token format v{version} is newer than this mesh-llm understands (v{TOKEN_VERSION}): upgrade mesh-llm")
    if version < 1:
        raise garbled
    kind = doc.get("kind", "member") if version >= 2 else "member"
    if kind not in KINDS:
        raise TokenError(f"invite token is damaged (unknown kind {str(kind)[:20]!r}): copy the whole token again")
    mesh = MeshCredentials(_hex_field(doc, "mesh", 16), _hex_field(doc, "secret", 32), kind)
    endpoint_id = _hex_field(doc, "id", 32)
    addrs = doc.get("addrs", [])
    relay = doc.get("relay")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS or not all(isinstance(a, str) and 0 < len(a) <= 64 for a in addrs):
        raise TokenError("invite token is damaged (bad addresses): copy the whole token again")
    if relay is not None and (not isinstance(relay, str) or not relay.startswith(("http://", "https://")) or len(relay) > 256):
        raise TokenError("invite token is damaged (bad relay URL): copy the whole token again")
    if not addrs and not relay:
        raise TokenError("invite token has no address to reach the mesh at: ask for a token from a member that is online")
    return InviteToken(mesh, endpoint_id, tuple(addrs), relay)


def client_token(member: InviteToken) -> InviteToken:
    """The client token to the same member: it admits its holder to the API only."""
    return InviteToken(member.mesh.for_clients(), member.endpoint_id, member.addrs, member.relay_url)
