"""Hugging Face hub access: cache lookups, resumable downloads, repo listing, search.

Files land in the standard Hugging Face cache (blobs/ + snapshots/<commit>/),
so `huggingface-cli`, llama.cpp's `-hf` and other tools see them and vice versa.
`huggingface_hub` supplies the cache layout, metadata, HTTP and progress bar;
this module adds what it no longer does: a partial file with a stable name
(`blobs/<etag>.incomplete`) that a later run resumes with an HTTP Range request
after the process was killed (and deleted once the hub serves a new version of
that file), and a disk-space check that stops before starting.
`HF_ENDPOINT` points all of it at a mirror or a local stand-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mesh_llm.errors import NotFound, UserError
from mesh_llm.files import SHARED_READ, open_append, write_private
from mesh_llm.models.catalog import shard_files

DISK_MARGIN = 512 * 1024 * 1024  # keep this much free after a download
SAFE_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,128}")  # commit hashes and ETags become file names


@dataclass(frozen=True)
class HubHit:
    repo: str
    downloads: int
    likes: int


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_file(repo: str, file: str, revision: str = "main") -> Path | None:
    """The file's path if the cache holds it for that revision (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, file, revision=revision)
    except ValueError:  # a repo id the hub would reject
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def cached_model(repo: str, file: str, revision: str = "main") -> Path | None:
    """The first file of a model if every one of its files is cached."""
    paths = [cached_file(repo, f, revision) for f in shard_files(file)]
    return paths[0] if all(paths) else None


def disk_shortfall(needed: int, free: int, margin: int = DISK_MARGIN) -> int:
    """Bytes missing to store `needed` more while keeping `margin` free (0: enough)."""
    return max(0, needed + margin - free)


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """One-line errors for the ways the hub can fail."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except OfflineModeIsEnabled:
        raise UserError(f"cannot fetch {what}: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({hub_cache()})") from None
    except (httpx2.TransportError, ConnectionError) as exc:
        raise UserError(
            f"cannot reach {endpoint()} to fetch {what} ({type(exc).__name__}: {exc or 'no answer'}): "
            "check the network, or pass a local .gguf path"
        ) from None
    except GatedRepoError:
        raise UserError(f"{what} is gated: accept its licence on the hub and log in (`hf auth login`), then retry") from None
    except RepositoryNotFoundError:
        raise NotFound(f"{what}: no such repository on {endpoint()} (or it is private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what}: no such revision on {endpoint()}") from None
    except RemoteEntryNotFoundError:
        raise NotFound(f"{what}: no such file in the repository; `mesh-llm models show ORG/REPO` lists its GGUF files") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise UserError(f"the hub answered HTTP {status} for {what}: try again later") from None
    except OSError as exc:  # a full disk, a read-only cache, a transfer that ended short: the partial file stays
        raise UserError(f"could not download {what} ({exc.strerror or str(exc).splitlines()[0]}): fix that and run the same command again to resume") from None


def download_model(repo: str, file: str, revision: str = "main", say: Callable[[str], None] = print) -> Path:
    """Fetch every file of a model (all shards of a split GGUF); returns the first."""
    paths = [download_file(repo, f, revision, say) for f in shard_files(file)]
    return paths[0]


def check_names(repo: str, file: str, revision: str) -> None:
    """Refuse names that could place files outside the cache: every download passes here,
    whether the name came from the user, the catalog or a hub listing."""
    from mesh_llm.models.reference import ReferenceError, valid_path, valid_repo

    try:
        valid_repo(repo)
        valid_path(file, f"{repo}/{file}")
        valid_path(revision, f"{repo}@{revision}")
    except ReferenceError as exc:
        raise UserError(str(exc)) from None


def download_file(repo: str, file: str, revision: str = "main", say: Callable[[str], None] = print) -> Path:
    check_names(repo, file, revision)
    hit = cached_file(repo, file, revision)
    if hit is not None:
        return hit
    what = f"{repo}/{file}"
    if offline():
        raise UserError(f"cannot fetch {what}: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache ({hub_cache()})")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _get_pointer_path, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    with hub_errors(what):
        meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision), timeout=15)
    if not (meta.commit_hash and meta.etag and SAFE_NAME.fullmatch(meta.commit_hash) and SAFE_NAME.fullmatch(meta.etag)):
        raise UserError(f"{endpoint()} did not say which version of {what} it serves (missing or odd commit/ETag headers): is HF_ENDPOINT a Hugging Face hub?")
    folder = repo_folder_name(repo_id=repo, repo_type="model")
    storage = hub_cache() / folder
    blob = storage / "blobs" / meta.etag
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(endpoint()).netloc:
        headers.pop("authorization", None)  # a signed CDN link: the hub token stays with the hub
    with hub_errors(what):
        pointer = Path(_get_pointer_path(str(storage), meta.commit_hash, file))  # refuses paths leaving snapshots/
        pointer.parent.mkdir(parents=True, exist_ok=True)  # early, as huggingface_hub does: `hf cache` sees a partial repo
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock = hub_cache() / ".locks" / folder / f"{meta.etag}.lock"  # the lock huggingface_hub itself takes
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            _drop_stale_partials(lock.parent, blob.parent, revision, file, meta.etag)
            if not blob.is_file():
                note = lock.with_name(f"{meta.etag}.partial")  # whose partial this is, for the line above in a later run
                write_private(note, _owner(revision, file), SHARED_READ)
                _fetch_blob(meta.location, blob, meta.size, what, say, headers)
                note.unlink(missing_ok=True)
            if not pointer.exists():
                pointer.unlink(missing_ok=True)  # a dangling link from a removed blob
                pointer.symlink_to(os.path.relpath(blob, pointer.parent))
            _cache_commit_hash_for_specific_revision(str(storage), revision, meta.commit_hash)
    return pointer


def _owner(revision: str, file: str) -> str:
    return json.dumps([revision, file])


def _drop_stale_partials(locks: Path, blobs: Path, revision: str, file: str, etag: str) -> None:
    """Delete the partial of an older version of this file at this revision: the hub now serves another
    ETag, so no later run for this revision resumes it and it would hold its disk forever. The HF layout
    cannot tell whose partial is whose, hence the notes; other files' partials, and one that another
    process is fetching (its lock held), stay."""
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    for note in locks.glob("*.partial"):
        old = note.name.removesuffix(".partial")
        with contextlib.suppress(OSError):
            if old == etag or note.read_text() != _owner(revision, file):
                continue
            try:
                with WeakFileLock(locks / f"{old}.lock", timeout=0.1):
                    (blobs / f"{old}.incomplete").unlink(missing_ok=True)
                    note.unlink()
            except Timeout:
                pass


def _fetch_blob(url: str, blob: Path, size: int | None, what: str, say: Callable[[str], None], headers: dict[str, str]) -> None:
    from huggingface_hub.file_download import http_get

    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:  # not ours to trust
        partial.unlink()
        have = 0
    if size is not None:
        missing = disk_shortfall(size - have, shutil.disk_usage(blob.parent).free)
        if missing:
            raise UserError(
                f"not enough disk space for {what}: it needs {(size - have) / 1e9:.2f} GB more and {blob.parent} has "
                f"{shutil.disk_usage(blob.parent).free / 1e9:.2f} GB free; free {missing / 1e9:.2f} GB or set HF_HOME to a bigger disk"
            )
    total = f"{size / 1e9:.2f} GB" if size is not None else "unknown size"
    say(f"Downloading {what} ({total}) from {endpoint()}" + (f", resuming at {have / 1e9:.2f} GB" if have else "") + f" into {hub_cache()}")
    with open_append(partial) as f:  # a fixed name (huggingface_hub resumes it too): refuse a symlink there
        http_get(url, f, resume_size=have, headers=headers, expected_size=size, displayed_filename=Path(what).name)
    partial.replace(blob)


def list_repo_files(repo: str, revision: str = "main") -> list[str]:
    from huggingface_hub import HfApi

    if offline():
        raise UserError(f"cannot list {repo}: HF_HUB_OFFLINE is set; name a file (ORG/REPO/FILE.gguf) that is in the cache")
    with hub_errors(repo):
        return list(HfApi().list_repo_files(repo, revision=revision))


def search_hub(query: str, limit: int = 20) -> list[HubHit]:
    from huggingface_hub import HfApi

    with hub_errors(f"search results for {query!r}"):
        models = HfApi().list_models(search=query, filter="gguf", sort="downloads", limit=limit)
        return [HubHit(m.id, m.downloads or 0, m.likes or 0) for m in models]
