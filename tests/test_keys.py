"""API keys: the stored list, the node's key ring, the `auth key` commands and the guard's verdicts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mesh_llm.api.http_guard import Policy, guard_middleware
from mesh_llm.api.keys import KeyRing, create_key, key_hash, load_store, parse_key_file, revoke_key, store_path
from mesh_llm.errors import UserError
from tests.conftest import assert_one_line_error, free_port, run_cli


def test_a_created_key_is_stored_as_a_hash_privately(tmp_path: Path) -> None:
    key, stored = create_key(tmp_path, "laptop")
    assert key.startswith("mlk_") and len(key) >= 40 and key.startswith(stored.id)
    text = store_path(tmp_path).read_text()
    assert key not in text and key_hash(key) in text
    assert stat.S_IMODE(os.stat(store_path(tmp_path)).st_mode) == 0o600
    assert [k.label for k in load_store(store_path(tmp_path))] == ["laptop"]
    assert [p.name for p in tmp_path.iterdir()] == ["api-keys.json"]  # no temporary file left behind
    with pytest.raises(UserError, match="labelled 'laptop' exists"):
        create_key(tmp_path, "laptop")


def test_revoke_by_label_id_or_key_and_unknown_names_fail(tmp_path: Path) -> None:
    a, _ = create_key(tmp_path, "a")
    b, stored_b = create_key(tmp_path, "b")
    c, _ = create_key(tmp_path)
    assert revoke_key(tmp_path, "a").label == "a"
    assert revoke_key(tmp_path, stored_b.id + "…").label == "b"  # as `auth key list` shows it
    assert revoke_key(tmp_path, c).label == ""
    assert load_store(store_path(tmp_path)) == []
    with pytest.raises(UserError, match="no key 'zzz' here"):
        revoke_key(tmp_path, "zzz")
    with pytest.raises(UserError, match="no key"):
        revoke_key(tmp_path, "")


def test_the_key_ring_follows_its_files_and_fails_closed(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# ops keys\n\n  file-key-1  \nfile-key-2\n")
    ring = KeyRing(store_path(tmp_path / "state"), key_file)
    assert ring.required() and ring.accepts("file-key-1") and ring.accepts("file-key-2")
    assert not ring.accepts("file-key-3") and not ring.accepts(None) and not ring.accepts("# ops keys")
    made, _ = create_key(tmp_path / "state", "new")
    assert ring.accepts(made)  # made while the ring was in use
    revoke_key(tmp_path / "state", "new")
    assert not ring.accepts(made)
    key_file.write_text("file-key-3\n")
    assert ring.accepts("file-key-3") and not ring.accepts("file-key-1")
    key_file.unlink()  # gone by mistake: its last keys still hold, the API does not open
    assert ring.required() and ring.accepts("file-key-3")


def test_a_removed_key_list_keeps_its_keys_until_restart_and_says_so(tmp_path: Path) -> None:
    warnings: list[str] = []
    key, _ = create_key(tmp_path)
    ring = KeyRing(store_path(tmp_path), warn=warnings.append)
    assert ring.required() and ring.accepts(key)
    store_path(tmp_path).unlink()  # deleted by mistake: the running node must not open /v1
    assert ring.required() and ring.accepts(key) and ring.accepts(key)
    assert len(warnings) == 1 and "until the node restarts" in warnings[0]
    later, _ = create_key(tmp_path)  # a new list counts again
    assert ring.accepts(later) and not ring.accepts(key)
    revoke_key(tmp_path, later)  # revoking the last key is the way to open it
    assert not ring.required()
    assert not KeyRing(store_path(tmp_path / "fresh")).required()  # a node started with no list: open, as before


def test_no_keys_means_none_required_and_bad_files_stop_the_start(tmp_path: Path) -> None:
    assert not KeyRing(store_path(tmp_path)).required()
    with pytest.raises(UserError, match="does not exist"):
        KeyRing(store_path(tmp_path), tmp_path / "missing.txt")
    store_path(tmp_path).write_text("{not json")
    with pytest.raises(UserError, match="not a key list"):
        KeyRing(store_path(tmp_path))
    assert parse_key_file("a\n#b\n c \n\n") == ["a", "c"]


def test_a_key_file_others_may_write_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("team-key\n")
    for mode in (0o620, 0o602, 0o666):
        key_file.chmod(mode)
        with pytest.raises(UserError, match="writable by others.*chmod 600"):
            KeyRing(store_path(tmp_path), key_file)
    key_file.chmod(0o644)  # readable by all is the owner's business; writable by the owner only is what counts
    assert KeyRing(store_path(tmp_path), key_file).accepts("team-key")
    link = tmp_path / "mounted"
    link.symlink_to(key_file)  # mounted secrets (Kubernetes) are symlinks
    assert KeyRing(store_path(tmp_path), link).accepts("team-key")
    key_file.chmod(0o666)
    assert_one_line_error(run_cli("--model", str(tmp_path / "m.gguf"), "--api-key-file", str(key_file), "--port", str(free_port()), "--state-dir", str(tmp_path / "state")), "writable by others")


async def _verdict(policy: Policy, path: str, remote: str, headers: dict[str, str], console: bool = False) -> int:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    request = make_mocked_request("POST", path, headers={"Host": "localhost:3131", **headers}).clone(remote=remote)
    response = await guard_middleware(policy, wrong_host_hint="", local_without_key=console)(request, handler)
    return response.status


async def test_the_guard_asks_for_a_key_on_v1_only_and_the_console_lets_local_callers_chat(tmp_path: Path) -> None:
    key, _ = create_key(tmp_path)
    policy = Policy(listen_all=True, ports={3131}, keys=KeyRing(store_path(tmp_path)))
    remote, local = "192.0.2.7", "127.0.0.1"
    assert await _verdict(policy, "/v1/chat/completions", local, {}) == 401
    assert await _verdict(policy, "/v1/models", local, {}) == 401
    assert await _verdict(policy, "/v1/../v1/models", local, {}) == 401
    assert await _verdict(policy, "/v1/chat/completions", local, {"Authorization": f"Bearer {key}"}) == 200
    assert await _verdict(policy, "/v1/messages", remote, {"x-api-key": key}) == 200
    assert await _verdict(policy, "/v1/messages", remote, {"x-api-key": key + "x"}) == 401
    assert await _verdict(policy, "/health", remote, {}) == 200
    # The node's control routes: another machine needs a key (--listen-all --allow-remote-runtime), this one does not (mesh-llm load/status).
    for path in ("/api/status", "/api/events", "/metrics", "/api/runtime", "/api/runtime/models", "/api/runtime/models/x", "/api//runtime/./models", "/api/x/../runtime"):
        assert await _verdict(policy, path, remote, {}) == 401, path
        assert await _verdict(policy, path, remote, {"Authorization": f"Bearer {key}"}) == 200, path
        assert await _verdict(policy, path, local, {}) == 200, path
        assert await _verdict(policy, path, local, {}, console=True) == 200, path
        assert await _verdict(policy, path, local, {"Host": "rebound.example:3131"}) == 401, path
    assert await _verdict(policy, "/", remote, {}) == 200  # the console's page itself
    # The console: its own page on this machine chats without a key; another machine, or a rebinding name, needs one.
    assert await _verdict(policy, "/v1/chat/completions", local, {"Origin": "http://localhost:3131"}, console=True) == 200
    assert await _verdict(policy, "/v1/chat/completions", local, {}, console=True) == 200
    assert await _verdict(policy, "/v1/chat/completions", remote, {}, console=True) == 401
    assert await _verdict(policy, "/v1/chat/completions", remote, {"Authorization": f"Bearer {key}"}, console=True) == 200
    assert await _verdict(policy, "/v1/chat/completions", local, {"Host": "rebound.example:3131"}, console=True) == 401


def test_auth_key_commands(tmp_path: Path) -> None:
    state = ("--state-dir", str(tmp_path))
    made = run_cli("auth", "key", "create", "--label", "ci", *state)
    assert made.returncode == 0, made
    key = made.stdout.strip()
    assert key.startswith("mlk_") and "\n" not in key and "not shown again" in made.stderr  # KEY=$(mesh-llm auth key create) works
    listed = run_cli("auth", "key", "list", *state)
    assert listed.returncode == 0 and "ci" in listed.stdout and key[:12] in listed.stdout and key not in listed.stdout
    assert key_hash(key) not in listed.stdout
    assert_one_line_error(run_cli("auth", "key", "create", "--label", "ci", *state), "labelled 'ci' exists")
    assert_one_line_error(run_cli("auth", "key", "revoke", "nope", *state), "no key 'nope'")
    revoked = run_cli("auth", "key", "revoke", "ci", *state)
    assert revoked.returncode == 0 and "0 key(s) left" in revoked.stdout
    assert json.loads(store_path(tmp_path).read_text()) == {"keys": []}
    assert_one_line_error(run_cli("auth", "key", *state), code=2)
    assert_one_line_error(run_cli("--api-key-file", str(tmp_path / "missing"), "--model", "x", *state), "--api-key-file", "does not exist")
    assert_one_line_error(run_cli("--cors-origin", "evil", "--model", "x", *state), "--cors-origin", "not an origin")
    assert_one_line_error(run_cli("--max-inflight", "0", "--model", "x", *state), "--max-inflight")
    assert_one_line_error(run_cli("--upstream-timeout", "0", "--model", "x", *state), "--upstream-timeout")
