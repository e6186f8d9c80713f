"""This node's Ed25519 key (its endpoint id is the public half) and the mesh credentials.

Both live in the state dir with mode 0600: the key so a node keeps its id across
restarts, the credentials so invite tokens printed earlier stay valid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import UserError
from mesh_llm.files import read_private, write_private

KEY_FILE = "key"
MESH_FILE = "mesh.json"
PORT_FILE = "quic-port"  # the UDP port of the last run: tokens carry it, so a restart binds it again
LAST_JOIN_FILE = "last-join"  # the invite token this node last joined with: launchers rejoin that mesh


def new_secret_key() -> bytes:
    return secrets.token_bytes(32)


def load_or_create_key(state_dir: Path) -> bytes:
    path = state_dir / KEY_FILE
    text = read_private(path, "node key")
    if text is None:
        return rotate_key(state_dir)
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise UserError(f"node key {path} is corrupt: run `mesh-llm rotate-key` to make a new one")
    return key


def rotate_key(state_dir: Path) -> bytes:
    key = new_secret_key()
    write_private(state_dir / KEY_FILE, key.hex() + "\n")
    return key


KINDS = ("member", "client")
_CLIENT_LABEL = b"mesh-llm/client-secret/v1"


@dataclass(frozen=True)
class MeshCredentials:
    """What makes a mesh: a public id (tells meshes apart) and a secret (proves membership).

    Two kinds of holder. A member holds the mesh secret and may serve, host and lend
    workers. A client holds only the clients' secret, a one-way hash of the mesh secret:
    it proves the right to use the mesh's API and cannot be turned into a member's.
    """

    mesh_id: bytes  # 16 bytes
    secret: bytes  # 32 bytes: the mesh secret (member), or the clients' secret (client)
    kind: str = "member"

    @staticmethod
    def generate() -> MeshCredentials:
        return MeshCredentials(secrets.token_bytes(16), secrets.token_bytes(32))

    def secret_for(self, kind: str) -> bytes | None:
        """The key that proves `kind` admission, if this holder has it (a client has no member key)."""
        if kind == "member":
            return self.secret if self.kind == "member" else None
        if kind == "client":
            return self.secret if self.kind == "client" else hmac.new(self.secret, _CLIENT_LABEL, hashlib.sha256).digest()
        return None

    def for_clients(self) -> MeshCredentials:
        """What a client token carries."""
        client_secret = self.secret_for("client")
        assert client_secret is not None
        return MeshCredentials(self.mesh_id, client_secret, "client")


def load_mesh(state_dir: Path) -> MeshCredentials | None:
    path = state_dir / MESH_FILE
    text = read_private(path, "mesh credentials")
    if text is None:
        return None
    try:
        doc = json.loads(text)
        creds = MeshCredentials(bytes.fromhex(doc["mesh_id"]), bytes.fromhex(doc["secret"]))
    except (ValueError, KeyError, TypeError, OSError):
        raise UserError(f"mesh credentials {path} are corrupt: delete the file to start a new mesh") from None
    if len(creds.mesh_id) != 16 or len(creds.secret) != 32:
        raise UserError(f"mesh credentials {path} are corrupt: delete the file to start a new mesh")
    return creds


def save_mesh(state_dir: Path, creds: MeshCredentials) -> None:
    write_private(state_dir / MESH_FILE, json.dumps({"mesh_id": creds.mesh_id.hex(), "secret": creds.secret.hex()}) + "\n")


def load_last_port(state_dir: Path) -> int:
    """The QUIC port this node bound last time, or 0 (none, or a file that says nothing sensible)."""
    try:
        port = int((read_private(state_dir / PORT_FILE, "port file") or "").strip())
    except (UserError, ValueError):
        return 0
    return port if 0 < port < 65536 else 0


def save_last_port(state_dir: Path, addrs: tuple[str, ...]) -> None:
    """Remember the port of this run's direct addresses (the ones its tokens carry)."""
    ports = {int(a.rsplit(":", 1)[1]) for a in addrs if a.rsplit(":", 1)[-1].isdigit()}
    if len(ports) == 1 and load_last_port(state_dir) not in ports:
        write_private(state_dir / PORT_FILE, f"{ports.pop()}\n")


def load_last_join(state_dir: Path) -> str | None:
    """The invite token this machine last joined a mesh with (`--join`), or None."""
    text = (read_private(state_dir / LAST_JOIN_FILE, "last-join file") or "").strip()
    return text or None


def save_last_join(state_dir: Path, token: str) -> None:
    """Remember the token a join succeeded with (private: a member token admits its holder)."""
    if load_last_join(state_dir) != token:
        write_private(state_dir / LAST_JOIN_FILE, token + "\n")
