"""Local files another user could tamper with: the state dir, the secrets in it, temp files,
and invite tokens that stay out of the process list."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest

from mesh_llm.errors import UserError
from mesh_llm.files import ensure_state_dir, private_dir_problem, replacing, replacing_path, write_private
from mesh_llm.mesh.identity import KEY_FILE, MESH_FILE, MeshCredentials, load_mesh, load_or_create_key, rotate_key, save_mesh
from tests.conftest import LOCAL, assert_one_line_error, free_port, run_cli, wait_for

ME = os.geteuid()
NOBODY = 65534


def _dir_stat(mode: int, uid: int = ME) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, 0, 4096, 0, 0, 0))


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o755, 0o705])
def test_a_dir_only_we_can_write_is_fine(mode: int) -> None:
    assert private_dir_problem(Path("/s"), _dir_stat(mode), ME) is None


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o720, 0o1777])
def test_a_dir_others_can_write_is_refused_with_the_chmod_that_fixes_it(mode: int) -> None:
    problem = private_dir_problem(Path("/s"), _dir_stat(mode), ME)
    assert problem is not None and "writable by other users" in problem and "chmod 700 /s" in problem and "--state-dir" in problem
    assert f"{stat.S_IMODE(mode):04o}" in problem


def test_a_dir_of_another_user_is_refused() -> None:
    problem = private_dir_problem(Path("/s"), _dir_stat(0o700, uid=NOBODY), ME)
    assert problem == f"state dir /s is owned by uid {NOBODY}, not you: pass --state-dir DIR you own"


def test_a_fresh_state_dir_is_created_0700_even_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = ensure_state_dir(tmp_path / "a" / "state")
    finally:
        os.umask(old)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_a_world_writable_state_dir_stops_the_node_before_any_work(tmp_path: Path, tiny_model: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    r = run_cli("--model", str(tiny_model), "--port", str(free_port()), "--state-dir", str(state))
    assert_one_line_error(r, f"state dir {state} is writable by other users (mode 0777)", f"chmod 700 {state}", "--state-dir")
    assert list(state.iterdir()) == []  # no key, no mesh.json, no logs
    assert_one_line_error(run_cli("rotate-key", "--state-dir", str(state)), "writable by other users")


@pytest.mark.skipif(ME != 0, reason="making a dir another user owns needs root")
def test_a_state_dir_of_another_user_stops_the_node(tmp_path: Path) -> None:
    state = tmp_path / "theirs"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    from tests.test_cli_errors import _some_token

    r = run_cli("--client", "--join", _some_token(), "--port", str(free_port()), "--state-dir", str(state))
    assert_one_line_error(r, f"owned by uid {NOBODY}, not you", "--state-dir DIR you own")


def test_a_state_dir_that_is_a_file_or_a_dangling_link_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(run_cli("rotate-key", "--state-dir", str(tmp_path / "file")), "is not a directory")
    assert_one_line_error(run_cli("rotate-key", "--state-dir", str(tmp_path / "dangling")), "cannot use state dir", "--state-dir DIR")


def test_a_symlink_planted_at_a_guessable_temp_name_is_not_followed(tmp_path: Path) -> None:
    """The old writer opened `key.tmp` with O_TRUNC: a symlink there made it overwrite any file
    we can write with our secret key."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = ensure_state_dir(tmp_path / "state")
    for name in (KEY_FILE, MESH_FILE):
        (state / f"{name}.tmp").symlink_to(victim)
    key = rotate_key(state)
    save_mesh(state, MeshCredentials.generate())
    assert victim.read_text() == "precious\n"
    assert load_or_create_key(state) == key
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "secret"
    target.symlink_to(victim)
    write_private(target, "s3cret\n")
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink() and target.read_text() == "s3cret\n"


def test_written_files_are_0600_whatever_the_umask_and_no_temp_is_left(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "key", b"\x01\x02")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as f:
        f.write(b"half")
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError), replacing_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("bad assembly")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


@pytest.mark.parametrize("name", [KEY_FILE, MESH_FILE])
def test_a_secret_that_is_a_symlink_is_refused(tmp_path: Path, name: str) -> None:
    """A symlink in the state dir could point at another user's file, chosen to become our key."""
    elsewhere = tmp_path / "elsewhere"
    state = ensure_state_dir(tmp_path / "state")
    rotate_key(elsewhere)
    save_mesh(elsewhere, MeshCredentials.generate())
    (state / name).symlink_to(elsewhere / name)
    with pytest.raises(UserError, match="is a symbolic link: replace it with the file itself"):
        load_or_create_key(state) if name == KEY_FILE else load_mesh(state)


@pytest.mark.skipif(ME != 0, reason="a file another user owns needs root")
def test_a_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    rotate_key(state)
    os.chown(state / KEY_FILE, NOBODY, NOBODY)
    with pytest.raises(UserError, match=f"owned by uid {NOBODY}"):
        load_or_create_key(state)


def test_a_readable_key_is_made_private_again(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    rotate_key(state)
    (state / KEY_FILE).chmod(0o644)
    load_or_create_key(state)
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read --join-file"), ("", "is empty"), ("  \n\t\n", "is empty")])
def test_a_bad_join_file_is_one_line(tmp_path: Path, content: str | None, fragment: str) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    r = run_cli("--client", "--join-file", str(token_file), "--port", str(free_port()), "--state-dir", str(tmp_path / "s"))
    assert_one_line_error(r, fragment, str(token_file))


def test_a_join_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    r = run_cli("--client", "--join-file", str(tmp_path), "--port", str(free_port()), "--state-dir", str(tmp_path / "s"))
    assert_one_line_error(r, "cannot read --join-file")


def test_tokens_from_flag_file_and_environment_must_be_of_one_mesh(tmp_path: Path) -> None:
    from tests.test_cli_errors import _some_token

    token_file = tmp_path / "token"
    token_file.write_text(_some_token() + "\n")
    r = run_cli("--client", "--join-file", str(token_file), "--port", str(free_port()), "--state-dir", str(tmp_path / "s"), env={"MESH_LLM_TOKEN": _some_token()})
    assert_one_line_error(r, "different meshes")


def _cmdlines(pid: int) -> list[bytes]:
    """The raw /proc/<pid>/cmdline of a node and of everything it started: what `ps` shows anyone."""
    pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    out = []
    for p in pids:
        try:
            out.append(Path(f"/proc/{p}/cmdline").read_bytes())
        except OSError:
            pass
    return out


def test_nodes_join_with_the_token_from_the_environment_or_a_file_and_ps_never_shows_it(start_node, tiny_model, engine, tmp_path):
    first = start_node("--model", str(tiny_model), *LOCAL)
    first.wait_ready()
    token = first.token()
    first_id = first.node_id()
    by_env = start_node("--client", *LOCAL, env={"MESH_LLM_TOKEN": token})
    token_file = tmp_path / "invite"
    token_file.write_text(f"\n  {token}  \n")
    by_file = start_node("--join-file", str(token_file), *LOCAL)  # a standby member: it keeps mesh.json
    for node in (by_env, by_file):
        node.wait_ready()
        wait_for(lambda node=node: node.peer_ids() >= {first_id}, what="joined the first node")
        assert all(token.encode() not in line for line in _cmdlines(node.proc.pid))
    assert wait_for(lambda: len(first.peer_ids()) == 2, what="the first node sees both")
    assert load_mesh(by_file.state_dir) == load_mesh(first.state_dir)
    assert stat.S_IMODE((by_file.state_dir / MESH_FILE).stat().st_mode) == 0o600


# --- every other file the program writes goes through the same exclusive temp file -------------

def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return victim


def test_the_engine_source_download_never_writes_through_a_planted_symlink(tmp_path: Path, monkeypatch) -> None:
    from mesh_llm.engine.source import PinnedSource, fetch_sdist
    from tests.test_engine_pure import _fake_sdist

    monkeypatch.delenv("MESH_LLM_ENGINE_SDIST", raising=False)
    sdist, pin = _fake_sdist(tmp_path)
    served = PinnedSource(pin.package, pin.version, sdist.as_uri(), pin.sha256, pin.tree_prefix)
    downloads = tmp_path / "dl"
    downloads.mkdir()
    victim = _victim(tmp_path)
    (downloads / sdist.name).with_suffix(".part").symlink_to(victim)  # the name the old code wrote to
    bad = PinnedSource(pin.package, pin.version, served.url, "0" * 64, pin.tree_prefix)
    with pytest.raises(UserError, match="expected 0000"):
        fetch_sdist(bad, downloads)
    assert sorted(p.name for p in downloads.iterdir()) == ["pkg-1.0.tar.part"]  # nothing kept of a bad download
    assert fetch_sdist(served, downloads).read_bytes() == sdist.read_bytes()
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in downloads.iterdir()) == ["pkg-1.0.tar.gz", "pkg-1.0.tar.part"]


def test_the_fingerprint_cache_never_writes_through_a_planted_symlink(tmp_path: Path, tiny_model: Path) -> None:
    from mesh_llm.models.fingerprint import cached_fingerprint, fingerprint
    from mesh_llm.models.gguf_file import read_gguf

    cache = tmp_path / "fingerprints.json"
    victim = _victim(tmp_path)
    cache.with_suffix(f".{os.getpid()}.tmp").symlink_to(victim)  # the name the old code wrote to
    info = read_gguf(tiny_model)
    assert cached_fingerprint(info, cache) == fingerprint(info)
    assert victim.read_text() == "precious\n"
    assert str(tiny_model.resolve()) in cache.read_text()


def test_assembling_a_packaged_model_never_writes_through_a_planted_symlink(tmp_path: Path, monkeypatch) -> None:
    import sys
    import types

    from mesh_llm.models.catalog import CatalogEntry
    from mesh_llm.models.resolve import materialize, packaged_path

    def assemble(path: Path, overwrite: bool) -> Path:  # as the packages do: open the path given and write
        with open(path, "wb") as f:
            f.write(b"GGUF model bytes")
        return path

    monkeypatch.setitem(sys.modules, "fake_model_pkg", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path / "cache"))
    entry = CatalogEntry("fake", "", "fake.gguf", 0.1, "x", "chat", None, "", package="fake-model-pkg", module="fake_model_pkg")
    target = packaged_path(entry)
    target.parent.mkdir(parents=True)
    victim = _victim(tmp_path)
    target.with_suffix(f".partial-{os.getpid()}").symlink_to(victim)  # the name the old code wrote to
    assert materialize(entry).read_bytes() == b"GGUF model bytes"
    assert victim.read_text() == "precious\n"


def test_a_resumable_partial_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    from mesh_llm.files import open_append

    partial = tmp_path / "blob.incomplete"
    with open_append(partial) as f:
        f.write(b"ab")
    with open_append(partial) as f:
        f.write(b"cd")
    assert partial.read_bytes() == b"abcd"
    victim = _victim(tmp_path)
    link = tmp_path / "other.incomplete"
    link.symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        open_append(link)
    assert victim.read_text() == "precious\n"
