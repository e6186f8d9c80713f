"""The expert ranking of an MoE model (issue 17): pure rules, the cache, and llama-imatrix on tiny MoEs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh_llm.models import expert_rank
from mesh_llm.models.expert_rank import Ranking, cached_ranking, expert_ranking, imatrix_beside, measure_ranking, rank_from_counts, ranking_path, sequential
from mesh_llm.models.fingerprint import fingerprint
from mesh_llm.models.gguf_file import GGUFInfo, read_gguf
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model
from tests.conftest import assert_one_line_error, run_cli

FP = "0123456789abcdef" * 2
MOE = TinyModelSpec(seed=1, name="rank-moe", n_experts=8, n_experts_used=2)
HOT = TinyModelSpec(seed=1, name="rank-hot", n_experts=8, n_experts_used=2, hot_expert=5)


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Said(list[str]):
    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)


def write_cache(fingerprint: str, doc: object) -> Path:
    path = ranking_path(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def model(tmp_path: Path, spec: TinyModelSpec) -> tuple[Path, GGUFInfo, str]:
    path = write_tiny_model(tmp_path / f"{spec.name}.gguf", spec)
    info = read_gguf(path)
    return path, info, fingerprint(info)


# --- pure ---------------------------------------------------------------------------------


def test_most_selected_first_and_ties_keep_the_lower_id_first() -> None:
    r = rank_from_counts([3, 9, 9, 0, 5, 0])
    assert r.order == (1, 2, 4, 0, 3, 5) and r.counts == (3, 9, 9, 0, 5, 0) and r.source == "measured"
    assert rank_from_counts([0, 0, 0]).order == (0, 1, 2)


def test_sequential_is_id_order_with_no_counts() -> None:
    assert sequential(4) == Ranking((0, 1, 2, 3), (0, 0, 0, 0), "sequential")


def test_the_digest_names_the_order_only_and_is_stable() -> None:
    a = rank_from_counts([1, 5, 3])
    assert a.order == (1, 2, 0)
    assert a.digest == rank_from_counts([10, 50, 30]).digest == Ranking((1, 2, 0), (0, 0, 0), "sequential").digest
    assert len(a.digest) == 16 and int(a.digest, 16) >= 0
    assert a.digest == "1114b0d37cf4bdba"  # what other nodes compute: a change here splits a mesh of mixed versions
    assert len({a.digest, sequential(3).digest, rank_from_counts([5, 1, 3]).digest, sequential(4).digest}) == 4


@pytest.mark.parametrize(("order", "counts"), [((0, 0, 1), (0, 0, 0)), ((0, 1), (0, 0, 0)), ((1, 2), (0, 0)), ((0, 1), (1, -1))])
def test_a_ranking_is_a_permutation_with_one_count_per_expert(order: tuple[int, ...], counts: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Ranking(order, counts, "measured")


def test_a_cached_ranking_is_read_back(cache: Path) -> None:
    write_cache(FP, {"source": "measured", "order": [2, 0, 1], "counts": [5, 1, 7], "tokens": 4})
    assert cached_ranking(FP) == Ranking((2, 0, 1), (5, 1, 7), "measured")
    assert cached_ranking("f" * 32) is None  # another model: nothing cached


@pytest.mark.parametrize(
    "doc",
    [
        "{not json",
        "[]",
        {"source": "measured", "order": [0, 0, 1], "counts": [1, 1, 1]},  # not a permutation
        {"source": "measured", "order": [0, 1, 3], "counts": [3, 2, 1]},  # not 0..n-1
        {"source": "measured", "order": [0, 1], "counts": [2, 1, 0]},  # lengths differ
        {"source": "measured", "order": [1, 0], "counts": [2, 1]},  # an order the counts do not give
        {"source": "measured", "order": [0, 1], "counts": [2.5, 1]},
        {"source": "measured", "order": [True, False], "counts": [0, 1]},
        {"source": "measured", "order": [0, 1], "counts": [-1, -2]},
        {"source": "sequential", "order": [0, 1], "counts": [0, 0]},  # never cached, so never trusted
        {"source": "measured", "order": [], "counts": []},
        {"source": "measured", "order": list(range(513)), "counts": [0] * 513},  # more than llama.cpp's 512
        {"order": [0, 1], "counts": [2, 1]},
    ],
)
def test_a_corrupt_or_hostile_cache_file_is_ignored(cache: Path, doc: object) -> None:
    write_cache(FP, doc)
    assert cached_ranking(FP) is None


def test_an_oversized_cache_file_or_a_fingerprint_that_is_not_hex_is_ignored(cache: Path) -> None:
    write_cache(FP, json.dumps({"source": "measured", "order": [0], "counts": [1]}) + " " * 100_000)
    assert cached_ranking(FP) is None
    assert cached_ranking("../../etc/passwd") is None and cached_ranking("") is None


def test_without_llama_imatrix_the_order_is_sequential_with_one_note(cache: Path, tmp_path: Path) -> None:
    path, info, fp = model(tmp_path, MOE)
    for imatrix in (None, tmp_path / "bin" / "llama-imatrix"):
        said = Said()
        assert expert_ranking(imatrix, path, info, fp, said) == sequential(8)
        assert len(said) == 1 and "sequential" in said[0] and "llama-imatrix" in said[0], said
    assert cached_ranking(fp) is None and imatrix_beside(tmp_path / "bin" / "llama-server") is None


def test_a_dense_model_has_no_ranking(tmp_path: Path) -> None:
    path, info, fp = model(tmp_path, TinyModelSpec(name="dense"))
    with pytest.raises(ValueError):
        expert_ranking(None, path, info, fp, Said())


def fake_imatrix(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake" / "llama-imatrix"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('echo "0.00.001.000 E llama_model_load: error loading model: boom"; exit 1', "error loading model: boom"),
        ("exit 3", "exited with 3"),
        ('while [ "$1" != "-o" ]; do shift; done; echo garbage > "$2"', "unreadable"),  # "succeeds" with a file that is not GGUF
        ("exec sleep 30", "did not finish in time"),
    ],
)
def test_a_failed_measurement_says_why_and_gives_the_sequential_order_uncached(cache: Path, tmp_path: Path, body: str, why: str) -> None:
    path, info, fp = model(tmp_path, MOE)
    said = Said()
    assert measure_ranking(fake_imatrix(tmp_path, body), path, info, fp, said, timeout=2) == sequential(8)
    assert len(said) == 2 and said[0].startswith("Ranking the 8 experts of rank-moe"), said
    assert why in said[1] and "sequential" in said[1], said
    assert not ranking_path(fp).exists()


# --- with the pinned engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def imatrix(engine) -> Path:  # type: ignore[no-untyped-def]
    found = imatrix_beside(engine.llama_server)
    if found is None:
        pytest.skip(f"no llama-imatrix beside {engine.llama_server} (built by `mesh-llm engine build` since it is in the targets)")
    return found


def measured(imatrix: Path, tmp_path: Path, spec: TinyModelSpec) -> tuple[Ranking, int, Said]:
    path, info, fp = model(tmp_path, spec)
    said = Said()
    ranking = expert_ranking(imatrix, path, info, fp, said)
    tokens = json.loads(ranking_path(fp).read_text())["tokens"]
    return ranking, tokens, said


@pytest.mark.engine
def test_a_measured_ranking_counts_every_routed_token_once_per_layer(imatrix: Path, cache: Path, tmp_path: Path) -> None:
    ranking, tokens, said = measured(imatrix, tmp_path, MOE)
    assert ranking.source == "measured" and sorted(ranking.order) == list(range(8))
    assert ranking == rank_from_counts(ranking.counts)
    # each token picks n_experts_used distinct experts in each of the n_layers layers
    assert tokens == expert_rank.MAX_CHUNKS * expert_rank.CHUNK_TOKENS  # the text holds more than that in the tiny vocabulary
    assert sum(ranking.counts) == tokens * MOE.n_experts_used * MOE.n_layers
    assert len(said) == 2 and said[1].startswith(f"Ranked the 8 experts of rank-moe on {tokens} calibration tokens in "), said
    assert f"hottest {ranking.order[0]}, {ranking.order[1]}, {ranking.order[2]}, …" in said[1]


@pytest.mark.engine
def test_the_expert_every_router_prefers_ranks_first(imatrix: Path, cache: Path, tmp_path: Path) -> None:
    plain, _, _ = measured(imatrix, tmp_path / "plain", MOE)
    assert plain.order[0] != 5  # the same weights without the preference: 5 is not the hottest
    hot, tokens, _ = measured(imatrix, tmp_path / "hot", HOT)
    assert hot.order[0] == 5
    assert hot.counts[5] == tokens * HOT.n_layers  # chosen for every token in every layer


@pytest.mark.engine
def test_the_cache_answers_the_second_time_without_running_imatrix(imatrix: Path, cache: Path, tmp_path: Path) -> None:
    path, info, fp = model(tmp_path, MOE)
    first = expert_ranking(imatrix, path, info, fp, Said())
    said = Said()
    assert expert_ranking(tmp_path / "nowhere" / "llama-imatrix", path, info, fp, said) == first
    assert expert_ranking(fake_imatrix(tmp_path, "exit 1"), path, info, fp, said) == first
    assert said == [] and cached_ranking(fp) == first


@pytest.mark.engine
def test_measurements_are_deterministic(imatrix: Path, cache: Path, tmp_path: Path) -> None:
    path, info, fp = model(tmp_path, MOE)
    first = measure_ranking(imatrix, path, info, fp, Said())
    second = measure_ranking(imatrix, path, info, fp, Said())
    assert first == second and first.source == "measured"


@pytest.mark.engine
def test_a_text_shorter_than_the_chunks_is_repeated_and_one_too_short_gives_the_sequential_order(
    imatrix: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, info, fp = model(tmp_path, MOE)
    monkeypatch.setattr(expert_rank, "calibration_text", lambda: "A short text: 1, 2, 3. def f(x): return x * 2")  # under one chunk
    said = Said()
    ranking = measure_ranking(imatrix, path, info, fp, said)
    assert ranking.source == "measured", said
    tokens = json.loads(ranking_path(fp).read_text())["tokens"]
    assert tokens == expert_rank.MAX_CHUNKS * expert_rank.CHUNK_TOKENS
    assert sum(ranking.counts) == tokens * MOE.n_experts_used * MOE.n_layers
    os.unlink(ranking_path(fp))
    monkeypatch.setattr(expert_rank, "PROMPT_BYTES", 10)  # two tokens: llama-imatrix refuses it
    monkeypatch.setattr(expert_rank, "calibration_text", lambda: "hi")
    said.clear()
    assert measure_ranking(imatrix, path, info, fp, said) == sequential(8)
    assert len(said) == 2 and "llama-imatrix exited with 1" in said[1], said
    assert not ranking_path(fp).exists()


def test_the_tiny_model_hook_takes_an_expert_id_of_an_moe_only() -> None:
    for kwargs in ({"hot_expert": 0}, {"n_experts": 4, "hot_expert": 4}, {"n_experts": 4, "hot_expert": -1}):
        with pytest.raises(ValueError, match="hot_expert"):
            TinyModelSpec(**kwargs)  # type: ignore[arg-type]


# --- mesh-llm models experts ------------------------------------------------------------------


@pytest.mark.engine
def test_models_experts_prints_the_ranking_measuring_it_once(imatrix: Path, tmp_path: Path) -> None:
    path, _, _ = model(tmp_path, HOT)
    env = {"MESH_LLM_CACHE_DIR": str(tmp_path / "cache"), "MESH_LLM_BIN_DIR": str(imatrix.parent)}
    first = run_cli("models", "experts", str(path), env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("Ranking the 8 experts of rank-hot") and lines[1].startswith("Ranked the 8 experts of rank-hot"), lines
    assert lines[2].startswith("rank-hot: 8 experts, 2 used per token; ranking measured, digest ")
    assert lines[3].split() == ["RANK", "EXPERT", "SELECTIONS", "SHARE"]
    rows = [ln.split() for ln in lines[4:]]
    tokens = expert_rank.MAX_CHUNKS * expert_rank.CHUNK_TOKENS
    assert len(rows) == 8 and rows[0] == ["1", "5", str(tokens * HOT.n_layers), "50.0%"]  # 5 is one of the two picks of every token
    assert sorted(int(r[1]) for r in rows) == list(range(8))
    again = run_cli("models", "experts", str(path), env=env)
    assert again.returncode == 0 and again.stdout.splitlines() == lines[2:], again.stdout  # cached: no second measurement


def test_models_experts_without_an_engine_shows_the_sequential_order(tmp_path: Path) -> None:
    path, _, _ = model(tmp_path, MOE)
    env = {"MESH_LLM_CACHE_DIR": str(tmp_path / "cache"), "MESH_LLM_BIN_DIR": "", "PATH": "/nonexistent"}
    shown = run_cli("models", "experts", str(path), env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "No llama-imatrix (`mesh-llm engine build` builds it) to rank the experts of rank-moe: using the sequential order 0..7"
    assert "ranking sequential" in lines[1] and [ln.split()[1:] for ln in lines[3:]] == [[str(e), "-", "-"] for e in range(8)]


def test_models_experts_of_a_dense_model_or_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    path, _, _ = model(tmp_path, TinyModelSpec(name="dense"))
    assert_one_line_error(run_cli("models", "experts", str(path)), "dense model", "no experts")
    assert_one_line_error(run_cli("models", "experts", str(tmp_path / "nope.gguf")), "not found")
    assert_one_line_error(run_cli("models", "experts"), "needs a model reference")
