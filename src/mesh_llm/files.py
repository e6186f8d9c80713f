"""Local files another user of this machine must not read, plant or swap.

The state dir holds the node key and the mesh secret, so it must be ours and
not writable by anyone else (else they could replace what we read, or plant a
symlink where we write). Every file the program writes goes through a temp file
created exclusively under a random name (O_CREAT|O_EXCL|O_NOFOLLOW: a symlink
planted at a guessed name is never followed) and then renamed over the target,
so readers never see half a file. Secrets are read with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mesh_llm.errors import UserError

PRIVATE = 0o600  # secrets: key, mesh.json, API keys
SHARED_READ = 0o644  # cache files that hold nothing secret (umask still applies)
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def private_dir_problem(path: Path, st: os.stat_result, uid: int) -> str | None:
    """Why `path` (described by `st`) is not safe to keep secrets in for user `uid`, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return f"state dir {path} is not a directory: pass --state-dir DIR"
    if st.st_uid != uid:
        return f"state dir {path} is owned by uid {st.st_uid}, not you: pass --state-dir DIR you own"
    if st.st_mode & 0o022:  # group/world *read* is the user's choice; write lets others swap our files
        mode = stat.S_IMODE(st.st_mode)
        return f"state dir {path} is writable by other users (mode {mode:04o}): run chmod 700 {path}, or pass --state-dir DIR"
    return None


def ensure_state_dir(path: Path) -> Path:
    """Create the state dir 0700 if it is missing; refuse one another user could tamper with."""
    try:
        path.mkdir(parents=True, mode=0o700)  # parents get the default mode: only this dir is ours to guard
    except FileExistsError:
        pass  # there already (or another node made it this moment): checked below like any other
    except OSError as exc:
        raise UserError(f"cannot create state dir {path}: {exc.strerror or exc}; pass --state-dir DIR") from None
    try:
        st = path.stat()
    except OSError as exc:  # e.g. a symlink to nowhere
        raise UserError(f"cannot use state dir {path}: {exc.strerror or exc}; pass --state-dir DIR") from None
    problem = private_dir_problem(path, st, os.geteuid())
    if problem:
        raise UserError(problem)
    return path


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    """An empty temp file beside `path`, new (never an existing file or a symlink) and ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOEXEC, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")


@contextlib.contextmanager
def replacing(path: Path, mode: int = PRIVATE) -> Iterator[BinaryIO]:
    """Write `path` as a whole: yields a file to write; on success it replaces `path`
    (a symlink there is replaced, not followed); on an exception nothing changes."""
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # a crash must not leave an empty key behind the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_path(path: Path, mode: int = PRIVATE) -> Iterator[Path]:
    """For writers that take a path (a package's `assemble`): yields the path of a fresh,
    exclusively created temp file; on success it replaces `path`."""
    fd, tmp = _create_temp(path, mode)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: str | bytes, mode: int = PRIVATE) -> None:
    """Atomically write `data` to `path` with `mode` (0600 by default) via an exclusive temp file."""
    with replacing(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def open_append(path: Path, mode: int = SHARED_READ) -> BinaryIO:
    """Open for appending (a resumable download's partial), refusing a symlink at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_FOLLOW | _CLOEXEC, mode)
    except OSError as exc:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link: delete it and retry") from None
        raise exc
    return os.fdopen(fd, "ab")


def read_private(path: Path, what: str) -> str | None:
    """The text of a secret file we wrote, or None if there is none. Refuses a symlink or
    another user's file in its place; tightens a mode that lets others read it."""
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if path.is_symlink():
            raise UserError(f"{what} {path} is a symbolic link: replace it with the file itself") from None
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {path} is not a regular file: delete it")
        if st.st_uid != os.geteuid():
            raise UserError(f"{what} {path} is owned by uid {st.st_uid}, not you: delete it")
        if st.st_mode & 0o077:
            os.fchmod(f.fileno(), PRIVATE)
        return f.read(1 << 20).decode("utf-8", "replace")  # ours are tiny; a planted huge file is not read whole


def read_token_file(path: Path) -> list[str]:
    """The invite tokens in a --join-file (whitespace separated); one line naming the fix otherwise."""
    try:
        with path.open("rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError as exc:
        raise UserError(f"cannot read --join-file {path}: {exc.strerror or exc}") from None
    tokens = text.split()
    if not tokens:
        raise UserError(f"--join-file {path} is empty: put the invite token in it")
    return tokens
