"""What a `--model` reference names (pure: no disk or network).

Forms, tried in this order:
- a Hugging Face URL: https://huggingface.co/ORG/REPO/resolve/REV/FILE.gguf (or /blob/);
- an existing local file, or anything spelled like a path (/…, ./…, ~/…, NAME.gguf);
- ORG/REPO/FILE.gguf shorthand for a file in a hub repo;
- ORG/REPO or ORG/REPO:QUANT, a repo whose GGUF file is chosen by quantization;
- a catalog name, matched fuzzily (`Qwen3-8B` → `Qwen3-8B-Q4_K_M`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mesh_llm.models.catalog import CatalogEntry, by_file, match, suggestions

HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
REPO_FILE = re.compile(rf"^({REPO_PART}/{REPO_PART})/(.+\.gguf)$", re.IGNORECASE)
REPO_ONLY = re.compile(rf"^({REPO_PART}/{REPO_PART})(?::([A-Za-z0-9_.-]+))?$")
DEFAULT_QUANT = "Q4_K_M"


class ReferenceError(ValueError):
    """A reference that names nothing usable; the message says what to type instead."""


class UnknownReference(ReferenceError):
    """A name that is no catalog model, file, repository or URL."""


@dataclass(frozen=True)
class LocalFile:
    path: Path


@dataclass(frozen=True)
class HubFile:
    repo: str
    file: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{self.repo}/{self.file}" + (f"@{self.revision}" if self.revision != "main" else "")


@dataclass(frozen=True)
class HubRepo:
    repo: str
    quant: str = ""  # "" picks Q4_K_M when the repo has it, else its only GGUF


@dataclass(frozen=True)
class CatalogModel:
    entry: CatalogEntry


ModelRef = LocalFile | HubFile | HubRepo | CatalogModel


def parse_reference(text: str, *, exists: Callable[[Path], bool] = Path.is_file, hub_hosts: set[str] | None = None) -> ModelRef:
    text = text.strip()
    if not text:
        raise ReferenceError("empty model reference")
    if "://" in text:
        return parse_hub_url(text, hub_hosts or hub_host_names())
    path = Path(text).expanduser()
    if exists(path) or text.startswith(("/", "./", "../", "~")):
        return LocalFile(path)
    if text.lower().endswith(".gguf") and text.count("/") < 2:
        entry = by_file(text) if "/" not in text else None  # a catalog file's name, not downloaded here
        return CatalogModel(entry) if entry else LocalFile(path)
    m = REPO_FILE.match(text)
    if m:
        return HubFile(valid_repo(m.group(1)), valid_path(m.group(2), text))
    m = REPO_ONLY.match(text)
    if m:
        return HubRepo(valid_repo(m.group(1)), m.group(2) or "")
    hits = match(text)
    if len(hits) == 1:
        return CatalogModel(hits[0])
    if hits:
        names = ", ".join(e.name for e in hits)
        raise ReferenceError(f"{text!r} matches several catalog models: {names}; pass one of these names")
    near = suggestions(text)
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    raise UnknownReference(
        f"unknown model {text!r}{hint}: pass a catalog name such as gemma-3-270m (`mesh-llm download` lists them), "
        "ORG/REPO/FILE.gguf, a Hugging Face URL, or a path to a .gguf file"
    )


def hub_host_names() -> set[str]:
    """huggingface.co and friends, plus the host of $HF_ENDPOINT (a mirror, or a test stand-in)."""
    hosts = set(HUB_HOSTS)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        hosts.add(urlsplit(endpoint).netloc.lower())
    return hosts


def parse_hub_url(url: str, hosts: set[str]) -> HubFile:
    parts = urlsplit(url)
    bad = ReferenceError(f"{url} is not a Hugging Face file URL: expected https://huggingface.co/ORG/REPO/resolve/main/FILE.gguf")
    if parts.scheme not in ("http", "https") or parts.netloc.lower() not in hosts:
        raise bad
    segments = [unquote(s) for s in parts.path.strip("/").split("/")]
    if len(segments) < 5 or segments[2] not in ("resolve", "blob") or not segments[-1].lower().endswith(".gguf"):
        raise bad
    org, repo, _, revision, *file = segments
    if not re.fullmatch(REPO_PART, org) or not re.fullmatch(REPO_PART, repo):
        raise bad
    return HubFile(valid_repo(f"{org}/{repo}"), valid_path("/".join(file), url), valid_path(revision, url))


def valid_repo(repo: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ReferenceError(f"{repo!r} is not a valid Hugging Face repo id (ORG/NAME: letters, digits, '-', '_', '.')") from None
    return repo


def valid_path(path: str, text: str) -> str:
    """A file or revision name inside a repo: no empty, `.` or `..` parts (they would leave the cache)."""
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise ReferenceError(f"{text} names a path outside its repository")
    return path


def has_quant(file: str, quant: str) -> bool:
    """`Q6_K` names …-Q6_K.gguf, not …-Q6_K_L.gguf (the quant is a whole word of the file name)."""
    want = re.escape(quant.lower())
    return re.search(rf"(?<![a-z0-9_]){want}(?![a-z0-9_])", Path(file).name.lower()) is not None


def pick_repo_file(ref: HubRepo, files: list[str]) -> str:
    """The GGUF of a repo to use: the one of the wanted quantization (first shard of a split file)."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    ggufs = [f for f in ggufs if not re.search(r"-(\d{5})-of-\d{5}\.gguf$", f) or "-00001-of-" in f]
    if not ggufs:
        raise ReferenceError(f"{ref.repo} has no GGUF files: pass ORG/REPO/FILE.gguf of a GGUF repo")
    quant = ref.quant or DEFAULT_QUANT
    hits = [f for f in ggufs if has_quant(f, quant)]
    if len(hits) == 1:
        return hits[0]
    if not hits and not ref.quant and len(ggufs) == 1:
        return ggufs[0]
    names = ", ".join(sorted(Path(f).name for f in (hits or ggufs))[:12])
    if hits:
        raise ReferenceError(f"{ref.repo}:{quant} matches several files ({names}): pass ORG/REPO/FILE.gguf")
    raise ReferenceError(f"{ref.repo} has no {quant} file; it has: {names}; pass {ref.repo}:QUANT or ORG/REPO/FILE.gguf")
