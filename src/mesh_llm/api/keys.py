"""API keys for the node's /v1 routes: made once, kept only as hashes.

`mesh-llm auth key create` prints a new key once and stores its SHA-256 (with a label, the
key's first characters as its id, and when it was made) in the state dir's api-keys.json,
written privately (0600) and atomically. `--api-key-file PATH` adds keys kept elsewhere,
one a line. A running node re-reads both files when they change (a stat per request), so
keys made or revoked while it runs count at once. Once any key exists, /v1 needs one, and so
do the runtime API, /api/status and /api/events for callers not on this machine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mesh_llm.errors import UserError
from mesh_llm.files import read_private, write_private

KEY_PREFIX = "mlk_"
STORE_FILE = "api-keys.json"
ID_CHARS = len(KEY_PREFIX) + 8  # what a listing shows of a key: enough to tell keys apart
MAX_LABEL = 64


@dataclass(frozen=True)
class StoredKey:
    id: str  # the key's first characters
    label: str
    sha256: str  # hex
    created: int  # unix seconds


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def store_path(state_dir: Path) -> Path:
    return state_dir / STORE_FILE


def load_store(path: Path) -> list[StoredKey]:
    """The stored keys ([] when there is no file yet)."""
    text = read_private(path, "the API key list")  # refuses a symlink or another user's file
    if text is None:
        return []
    try:
        doc = json.loads(text)
        return [StoredKey(str(k["id"]), str(k["label"]), str(k["sha256"]), int(k["created"])) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a key list written by mesh-llm: move it away (its keys stop working) and create new keys") from None


def save_store(path: Path, keys: list[StoredKey]) -> None:
    """Write the list privately (0600) and atomically: a reader sees the old list or the new one."""
    write_private(path, json.dumps({"keys": [asdict(k) for k in keys]}, indent=1))


def create_key(state_dir: Path, label: str = "") -> tuple[str, StoredKey]:
    """A new key (to print once) and what is stored of it."""
    label = label.strip()
    if len(label) > MAX_LABEL or not label.isprintable():
        raise UserError(f"--label must be printable and at most {MAX_LABEL} characters")
    path = store_path(state_dir)
    keys = load_store(path)
    if label and any(k.label == label for k in keys):
        raise UserError(f"a key labelled {label!r} exists: pick another label, or revoke it first (mesh-llm auth key revoke {label})")
    key = new_key()
    stored = StoredKey(key[:ID_CHARS], label, key_hash(key), int(time.time()))
    save_store(path, [*keys, stored])
    return key, stored


def revoke_key(state_dir: Path, ref: str) -> StoredKey:
    """Remove the key whose id or label is `ref` (the key itself works too)."""
    path = store_path(state_dir)
    keys = load_store(path)
    ref = ref.strip().rstrip("…")
    matches = [k for k in keys if ref and (ref in (k.label, k.id) or key_hash(ref) == k.sha256)]
    if not matches:
        listing = ", ".join(k.label or k.id for k in keys) or "none"
        raise UserError(f"no key {ref!r} here (keys: {listing}); see mesh-llm auth key list")
    if len(matches) > 1:
        raise UserError(f"{ref!r} names {len(matches)} keys: give the id from mesh-llm auth key list")
    save_store(path, [k for k in keys if k is not matches[0]])
    return matches[0]


def parse_key_file(text: str) -> list[str]:
    """Keys one a line; blank lines and # comments are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def read_key_file(path: Path) -> list[str]:
    """The keys in a --api-key-file. It may be a symlink (mounted secrets are) and anyone's to
    read, but only its owner (you, or root) may write it: a key planted there would open the API."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"--api-key-file {path} is not a regular file")
            if st.st_uid not in (os.geteuid(), 0):
                raise UserError(f"--api-key-file {path} is owned by uid {st.st_uid}, who could plant keys in it: use a file of yours (chmod 600)")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise UserError(f"--api-key-file {path} is writable by others, who could plant keys in it: chmod 600 {path}")
            text = f.read(1 << 20).decode()
        return parse_key_file(text)
    except FileNotFoundError:
        raise UserError(f"--api-key-file {path} does not exist: write one key per line there, or drop the option") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--api-key-file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyRing:
    """The keys a running node accepts: the state dir's list and the --api-key-file, each
    re-read when its file changes. A file that turns unreadable or is removed keeps the keys
    it had (failing closed: a half-written or removed-by-mistake file never opens the API
    of a running node; `warn` says so once). Revoking the last key (an empty list) does open
    it; so does a node started with no key file or an empty one."""

    def __init__(self, store: Path, key_file: Path | None = None, warn: Callable[[str], None] = lambda line: None) -> None:
        self.store, self.key_file, self.warn = store, key_file, warn
        self._warned: set[Path] = set()
        self._stamps: dict[Path, tuple[int, int, int] | None] = {}
        self._hashes: dict[Path, frozenset[bytes]] = {}
        load_store(store)  # a broken or unreadable file is a start-up error, not a silent "no keys"
        if key_file is not None:
            read_key_file(key_file)
        self._refresh()

    def _refresh(self) -> None:
        for path in (self.store, self.key_file):
            if path is None:
                continue
            stamp = _stamp(path)
            if path in self._stamps and stamp == self._stamps[path]:
                continue
            if stamp is None and self._hashes.get(path):  # it had keys: gone by mistake, or moved away to open the API?
                if path not in self._warned:
                    self._warned.add(path)
                    self.warn(f"{path} is gone: its keys still count until the node restarts (revoke keys with mesh-llm auth key revoke)")
                continue
            try:
                if path == self.key_file:
                    hashes = frozenset(bytes.fromhex(key_hash(k)) for k in read_key_file(path))
                else:
                    hashes = frozenset(bytes.fromhex(k.sha256) for k in load_store(path))
            except (UserError, ValueError):
                continue  # keep what it held (checked readable at start); try again next time
            self._stamps[path], self._hashes[path] = stamp, hashes

    def _all(self) -> list[bytes]:
        self._refresh()
        return [h for hashes in self._hashes.values() for h in hashes]

    def required(self) -> bool:
        return bool(self._all())

    def accepts(self, presented: str | None) -> bool:
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode()).digest()
        # every stored hash compared in constant time, no early exit
        return any([hmac.compare_digest(digest, h) for h in self._all()])


def list_lines(keys: list[StoredKey]) -> list[tuple[str, str, str]]:
    """(id, label, created) for `auth key list`: never the key, never its hash."""
    return [(k.id + "…", k.label or "-", time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created))) for k in keys]


def key_command(action: str, state_dir: Path, label: str, ref: str | None, say: Callable[[str], None], note: Callable[[str], None]) -> int:
    """`mesh-llm auth key create|list|revoke`. A new key alone goes to `say` (stdout: KEY=$(mesh-llm auth key create)), the rest to `note`."""
    if action == "create":
        key, stored = create_key(state_dir, label)
        say(key)
        note(f"New API key {stored.id}… {f'({stored.label}) ' if stored.label else ''}stored as a hash in {store_path(state_dir)}: "
            "copy it now, it is not shown again. Running nodes with this state dir require a key from now on.")
        return 0
    if action == "list":
        keys = load_store(store_path(state_dir))
        if not keys:
            say("No API keys: /v1 is open to every caller that can reach it (make one with mesh-llm auth key create).")
        for key_id, key_label, created in list_lines(keys):
            say(f"{key_id:<14} {key_label:<24} {created}")
        return 0
    assert ref is not None
    gone = revoke_key(state_dir, ref)
    left = len(load_store(store_path(state_dir)))
    say(f"Revoked {gone.id}… {f'({gone.label})' if gone.label else ''}; {left} key(s) left" + ("" if left else ": /v1 needs no key now unless --api-key-file gives some"))
    return 0
