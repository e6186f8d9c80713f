"""From a model reference to what the fleet needs to serve it: file, header, fingerprint,
memory need and draft. Slow work (a download, a fingerprint) happens here, before the
model enters the fleet; every bad input is a one-line UserError."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mesh_llm.engine.llama_server import choose_ctx
from mesh_llm.errors import UserError
from mesh_llm.mesh.peers import MAX_ALIAS_LEN, MAX_ALIASES, MAX_NAME_LEN
from mesh_llm.models.draft import choose_draft
from mesh_llm.models.expert_rank import expert_ranking
from mesh_llm.models.fingerprint import cached_fingerprint
from mesh_llm.models.gguf_file import GGUFInfo, inspect_model
from mesh_llm.models.moe_shard import unshardable
from mesh_llm.models.reference import LocalFile
from mesh_llm.models.resolve import parse, resolve_model
from mesh_llm.paths import cache_dir
from mesh_llm.plan.split import kv_cache_bytes, required_bytes
from mesh_llm.serving.runner import Draft, ModelSpec
from mesh_llm.text import is_name, printable


@dataclass(frozen=True)
class ModelOptions:
    """What the user chose for the models this node serves."""

    ctx_size: int | None = None  # None: min(8192, the model's)
    draft: str | None = None  # --draft REF; None: the catalog's pairing when it is on disk
    no_draft: bool = False
    draft_max: int = 8
    draft_device: str = "none"  # where a split host runs the draft: a local GPU, or "none" (its CPU)


def memory_need(info: GGUFInfo, ctx: int) -> int:
    """Bytes a model takes to run: weights with headroom plus the KV cache."""
    heads = int(info.arch_value("attention.head_count", 1) or 1)
    kv_heads = int(info.arch_value("attention.head_count_kv", heads) or heads)
    key_length, value_length = info.arch_value("attention.key_length"), info.arch_value("attention.value_length")
    kv = kv_cache_bytes(
        info.n_layers, ctx, heads, kv_heads, int(info.arch_value("embedding_length", 0) or 0),
        int(key_length) if key_length else None, int(value_length) if value_length else None,
    )
    return required_bytes(info.file_size, kv)


def aliases_of(ref: str, resolved_id: str, catalog_name: str | None) -> tuple[str, ...]:
    """The names besides its id a model answers to: what the user typed (unless it was a path
    or URL) and its catalog name."""
    names = []
    if "://" not in ref and not isinstance(parse(ref), LocalFile):
        names.append(ref.strip())
    if catalog_name:
        names.append(catalog_name)
    fits = [n for n in dict.fromkeys(names) if n != resolved_id and len(n) <= MAX_ALIAS_LEN and n.isprintable()]  # what peers accept
    return tuple(fits[:MAX_ALIASES])


def prepare(ref: str, options: ModelOptions, say: Callable[[str], None], fetch: bool = True) -> ModelSpec:
    """Find (or download, when `fetch`) the model and its draft, and check both, before any engine work."""
    resolved = resolve_model(ref, say=say, single_file=True, fetch=fetch)
    if not is_name(resolved.model_id, MAX_NAME_LEN):  # peers refuse such a name in gossip, and terminals act on it
        raise UserError(f"the model name {printable(resolved.model_id)!r} (from {printable(str(resolved.path))}) is not plain printable text "
                        f"of at most {MAX_NAME_LEN} characters: rename the file")
    info = inspect_model(resolved.path)
    fingerprint = cached_fingerprint(info, cache_dir() / "fingerprints.json")
    ctx = choose_ctx(options.ctx_size, info.context_length)
    chosen = None if options.no_draft else choose_draft(options.draft, resolved, info, say)
    draft = None
    if chosen is not None:
        draft = Draft(chosen.model_id, chosen.path, memory_need(chosen.info, ctx), options.draft_max, options.draft_device)
    return ModelSpec(
        model_id=resolved.model_id, path=resolved.path, info=info, fingerprint=fingerprint, need=memory_need(info, ctx), ctx=ctx,
        aliases=aliases_of(ref, resolved.model_id, resolved.entry.name if resolved.entry else None), draft=draft,
    )


def with_ranking(spec: ModelSpec, imatrix: Path | None, offer: int, say: Callable[[str], None]) -> ModelSpec:
    """An MoE model this node cannot hold whole may be sharded by experts: it gets its expert
    ranking (cached for the file, else measured with the engine's llama-imatrix)."""
    if not spec.info.is_moe or spec.need <= offer or unshardable(spec.info):
        return spec
    ranking = expert_ranking(imatrix, spec.path, spec.info, spec.fingerprint, say)
    return replace(spec, ranking=ranking.order, ranking_measured=ranking.source == "measured")
