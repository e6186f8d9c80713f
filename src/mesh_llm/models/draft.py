"""Which draft model runs next to a target for speculative decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.errors import UserError
from mesh_llm.models.catalog import model_id
from mesh_llm.models.gguf_file import GGUFInfo, inspect_model
from mesh_llm.models.reference import CatalogModel
from mesh_llm.models.resolve import ResolvedModel, locate, paired_draft, resolve_model
from mesh_llm.models.vocab import vocab_mismatch


@dataclass
class DraftModel:
    model_id: str
    path: Path
    info: GGUFInfo


def choose_draft(explicit: str | None, target: ResolvedModel, info: GGUFInfo, say: Callable[[str], None]) -> DraftModel | None:
    """--draft if given (refused when its vocabulary does not match), else the catalog's pairing if on disk."""
    paired = paired_draft(target)
    if explicit:
        found = resolve_model(explicit, say=say)
        draft = DraftModel(found.model_id, found.path, inspect_model(found.path))
        why = vocab_mismatch(info, draft.info)
        if why:
            hint = f"the catalog pairs it with {paired.name}" if paired else "pick a model of the same family"
            raise UserError(f"--draft {explicit} cannot draft for {target.model_id}: {why}; {hint}, or pass --no-draft")
        return draft
    if paired is None:
        return None
    path = locate(CatalogModel(paired))
    if path is None:
        say(f"Tip: {paired.name} ({paired.size_gb:g} GB) speeds up {target.model_id} as a draft: mesh-llm download {paired.name}")
        return None
    draft = DraftModel(model_id(path.name), path, inspect_model(path))
    why = vocab_mismatch(info, draft.info)
    if why:
        say(f"Not using {paired.name} as a draft for {target.model_id}: {why}")
        return None
    return draft
