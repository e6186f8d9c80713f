"""`mesh-llm download` and `mesh-llm models …`: the catalog, the cache, the hub."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from mesh_llm.errors import UserError
from mesh_llm.models import hub
from mesh_llm.models.catalog import CatalogEntry, by_file, draft_of, load_catalog, model_id, search
from mesh_llm.models.gguf_file import inspect_model
from mesh_llm.models.reference import CatalogModel, HubFile, HubRepo, ReferenceError, pick_repo_file
from mesh_llm.models.resolve import locate, packaged_path, paired_draft, parse, resolve_model
from mesh_llm.plan.capacity import choose_offer, nvml_devices, system_memory_bytes
from mesh_llm.plan.split import required_bytes
from mesh_llm.text import printable


def download_command(ref: str | None, with_draft: bool, out: Console) -> int:
    if ref is None:
        return list_catalog(out)
    say = _sayer(out)
    model = resolve_model(ref, say=say)
    out.print(f"{model.model_id}: {model.path}", markup=False, highlight=False)
    if with_draft:
        draft = paired_draft(model)
        if draft is None:
            out.print(f"{model.model_id} has no paired draft in the catalog; pass --draft PATH|NAME when serving to use one")
            return 0
        path = resolve_model(draft.name, say=say).path
        out.print(f"draft {draft.name}: {path}", markup=False, highlight=False)
    return 0


def models_command(action: str, arg: str | None, with_draft: bool, out: Console, *, bin_dir: Path | None = None) -> int:
    if action == "recommended":
        return recommended(out)
    if action == "installed":
        return installed(out)
    if arg is None:
        raise UserError(f"mesh-llm models {action} needs a {'QUERY' if action == 'search' else 'model reference'}")
    if action == "search":
        return search_command(arg, out)
    if action == "show":
        return show(arg, out)
    if action == "experts":
        return experts(arg, bin_dir, out)
    return download_command(arg, with_draft, out)


def print_columns(out: Console, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Aligned plain text: names stay whole (people copy them), the last column runs on."""
    rows = [tuple(printable(c, 1000) for c in r) for r in rows]  # cells may come from peers (mesh-llm status)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        out.print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1], markup=False, highlight=False)


def list_catalog(out: Console) -> int:
    rows = [(e.name, f"{e.size_gb:g} GB", e.draft or "-", "yes" if locate(CatalogModel(e)) else "", e.description) for e in load_catalog()]
    print_columns(out, ("NAME", "SIZE", "DRAFT", "ON DISK", "ABOUT"), rows)
    out.print("Download: mesh-llm download NAME [--draft]   (names match loosely: 3b, Qwen3-8B, coder 32b)")
    out.print("Also accepted anywhere a model is named: ORG/REPO/FILE.gguf, ORG/REPO[:QUANT], a Hugging Face URL, a local path.")
    return 0


def recommended(out: Console) -> int:
    offer = choose_offer(nvml_devices(), system_memory_bytes(), source="NVML")
    out.print(f"This machine offers {offer.bytes / 1e9:.1f} GB ({offer.device}, {offer.source if offer.device != 'CPU' else '75% of RAM'}).")
    rows = []
    for e in load_catalog():
        if e.role == "draft":
            continue
        need = required_bytes(e.size_bytes, 0)
        machines = -(-need // max(offer.bytes, 1))
        fits = "here" if need <= offer.bytes else f"split over >={machines} like this"
        rows.append((e.name, f"{e.size_gb:g} GB", fits, e.draft or "-", e.description))
    print_columns(out, ("NAME", "SIZE", "FITS", "DRAFT", "ABOUT"), rows)
    return 0


def installed(out: Console) -> int:
    rows = []
    for e in load_catalog():
        if e.package and packaged_path(e).is_file():
            rows.append((e.name, packaged_path(e), packaged_path(e).stat().st_size))
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hub.hub_cache())
    except CacheNotFound:
        cache = None
    for repo in sorted(cache.repos, key=lambda r: r.repo_id) if cache else []:
        for rev in repo.revisions:
            for f in sorted(rev.files, key=lambda f: f.file_name):
                name = str(f.file_path.relative_to(rev.snapshot_path))
                if not name.lower().endswith(".gguf") or ("-of-" in name and "-00001-of-" not in name):
                    continue
                entry = by_file(name)
                rows.append((entry.name if entry else f"{repo.repo_id}/{name}", f.file_path, f.size_on_disk))
    if not rows:
        out.print(f"No models yet in {hub.hub_cache()}: `mesh-llm download` lists the catalog")
        return 0
    print_columns(out, ("MODEL", "SIZE", "PATH"), [(name, f"{size / 1e9:.2f} GB", str(path)) for name, path, size in rows])
    return 0


def search_command(query: str, out: Console) -> int:
    hits = search(query)
    for e in hits:
        out.print(f"catalog  {e.name:<44} {e.size_gb:>6g} GB  {e.description}", markup=False, highlight=False)
    try:
        found = hub.search_hub(query)
    except UserError as exc:
        out.print(f"(hub search unavailable: {exc})", markup=False, highlight=False)
        return 0 if hits else 1
    for h in found:
        out.print(f"hub      {h.repo:<44} {h.downloads:>9,} downloads  mesh-llm models show {h.repo}", markup=False, highlight=False)
    if not hits and not found:
        out.print(f"nothing matches {query!r}", markup=False, highlight=False)
        return 1
    return 0


def show(text: str, out: Console) -> int:
    ref = parse(text)

    def line(key: str, value: object) -> None:
        out.print(f"{key:<10}: {value}", markup=False, highlight=False)

    entry: CatalogEntry | None = ref.entry if isinstance(ref, CatalogModel) else None
    if isinstance(ref, HubRepo):
        files = hub.list_repo_files(ref.repo)
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        line("repo", ref.repo)
        line("files", ", ".join(ggufs) or "no GGUF files")
        try:
            line("picks", pick_repo_file(ref, files))
        except ReferenceError as exc:
            line("picks", exc)
        return 0
    path = locate(ref)
    if entry is None and path is not None:
        entry = by_file(path.name)
    if isinstance(ref, HubFile):
        entry = entry or by_file(ref.file)
        line("source", f"{ref.repo}/{ref.file} @ {ref.revision}")
    if entry is not None:
        line("catalog", f"{entry.name} — {entry.description}")
        line("source", entry.ref)
        line("size", f"{entry.size_gb:g} GB" + (f" in {entry.parts} files" if entry.parts > 1 else ""))
        draft = draft_of(entry)
        line("draft", f"{draft.name} ({'on disk' if locate(CatalogModel(draft)) else 'not downloaded'})" if draft else "none paired")
    if path is None:
        line("on disk", f"no — mesh-llm models download {text}")
        return 0
    info = inspect_model(Path(path))
    line("id", model_id(Path(path).name))
    line("on disk", path)
    line("arch", f"{info.architecture}, {info.n_layers} layers, context {info.context_length}, {info.file_size / 1e9:.2f} GB")
    if info.is_moe:
        groups = f", in {info.n_expert_groups} groups" if info.n_expert_groups else ""
        line("experts", f"{info.n_experts} ({info.n_experts_used} used per token){groups}")
    line("vocab", f"{info.metadata.get('tokenizer.ggml.model', '?')}, {info.array_lengths.get('tokenizer.ggml.tokens', 0)} tokens")
    return 0


def experts(text: str, bin_dir: Path | None, out: Console) -> int:
    """The experts of a local MoE file, hottest first (measured with llama-imatrix once, then cached)."""
    from mesh_llm.engine.provision import provide_engine
    from mesh_llm.models.expert_rank import expert_ranking, imatrix_beside
    from mesh_llm.models.fingerprint import cached_fingerprint
    from mesh_llm.paths import cache_dir

    resolved = resolve_model(text, fetch=False)
    info = inspect_model(resolved.path)
    if not info.is_moe:
        raise UserError(f"{resolved.model_id} is a dense model: it has no experts to rank")
    try:
        engine = provide_engine(bin_dir, None, Console(stderr=True), allow_build=False)
    except UserError:
        if bin_dir is not None:
            raise
        engine = None  # no engine at all: the ranking says it falls back to the sequential order
    fingerprint = cached_fingerprint(info, cache_dir() / "fingerprints.json")
    ranking = expert_ranking(imatrix_beside(engine.llama_server) if engine else None, resolved.path, info, fingerprint, _sayer(out))
    total = sum(ranking.counts)
    out.print(f"{resolved.model_id}: {info.n_experts} experts, {info.n_experts_used} used per token; ranking {ranking.source}, digest {ranking.digest}", markup=False, highlight=False)
    rows = [(str(rank), str(e), str(ranking.counts[e]) if total else "-", f"{100 * ranking.counts[e] / total:.1f}%" if total else "-") for rank, e in enumerate(ranking.order, 1)]
    print_columns(out, ("RANK", "EXPERT", "SELECTIONS", "SHARE"), rows)
    return 0


def _sayer(out: Console) -> Callable[[str], None]:
    return lambda line: out.print(line, markup=False, highlight=False)
