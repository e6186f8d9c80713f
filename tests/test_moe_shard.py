"""Expert shards of an MoE GGUF (issue 17 step 3): which tensors are cut, sizes, cache keys,
the bytes of a built shard, llama-server serving one, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import quantize

from mesh_llm.models.gguf_file import inspect_model, read_gguf
from mesh_llm.models.moe_shard import _Writer, ensure_shard, expert_bytes, is_expert_tensor, shard_bytes, shard_path, write_shard
from mesh_llm.models.tiny import TinyModelSpec, write_tiny_model

SPEC = TinyModelSpec(n_experts=8, n_experts_used=2, seed=21, name="tiny-moe8", dtype="f16")
KEEP = (6, 1, 4)  # unsorted on purpose: the shard keeps them in id order


@pytest.fixture(scope="module")
def moe8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("moe8") / "tiny-moe8.gguf", SPEC)


@pytest.fixture(scope="module")
def shard(moe8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("shard") / "tiny-moe8.gguf"  # the node names a model after its file
    write_shard(moe8, dst, KEEP)
    return dst


def fields(reader: GGUFReader) -> dict[str, object]:
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_expert_tensors_are_the_routed_experts_their_biases_and_the_router_not_shared_experts() -> None:
    for name in ("blk.0.ffn_gate_exps.weight", "blk.3.ffn_up_exps.weight", "blk.12.ffn_down_exps.weight", "blk.1.ffn_down_exps.bias",
                 "blk.2.exp_probs_b.bias", "blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp.bias", "blk.5.ffn_gate_up_exps.weight"):
        assert is_expert_tensor(name), name
    for name in ("blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight",
                 "blk.0.ffn_gate.weight", "blk.0.ffn_norm.weight", "blk.0.ffn_norm_exps.weight", "blk.0.attn_q.weight", "token_embd.weight", "output.weight"):
        assert not is_expert_tensor(name), name


def test_expert_bytes_add_up_to_the_tensor_bytes_and_shard_bytes_to_about_the_file(moe8: Path, shard: Path) -> None:
    info = read_gguf(moe8)
    trunk, per_expert = expert_bytes(info)
    assert trunk + 8 * per_expert == info.tensor_bytes
    assert trunk == sum(t.n_bytes for t in info.tensors if "exps" not in t.name and "gate_inp" not in t.name)
    # per layer: router row (64 f32) + gate, up, down (128 x 64 f16 each)
    assert per_expert == SPEC.n_layers * (64 * 4 + 3 * 128 * 64 * 2)
    assert shard_bytes(info, 8) >= info.file_size
    assert shard_bytes(info, 3) >= shard.stat().st_size > trunk + 3 * per_expert
    assert shard_bytes(info, 3) - shard.stat().st_size < (2 << 20)  # the allowance is rough, not huge
    dense = read_gguf(write_tiny_model(moe8.with_name("dense.gguf"), TinyModelSpec()))
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        expert_bytes(dense)


def test_the_shard_path_names_file_ranking_and_assignment_but_not_the_order_of_the_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path))
    fp = "0123456789abcdef" * 2
    path = shard_path(fp, [1, 4, 6])
    assert path.parent == tmp_path / "moe" / fp[:16] and path.suffix == ".gguf" and len(path.stem) == 16
    assert shard_path(fp, [6, 1, 4]) == path  # the same experts, whichever ranking chose them: the same bytes
    assert shard_path(fp, [1, 4, 7]) != path
    assert shard_path(fp, [1, 4]) != path
    assert shard_path("f" * 32, [1, 4, 6]).parent != path.parent


def test_a_shard_holds_the_kept_experts_in_id_order_and_the_trunk_byte_for_byte(moe8: Path, shard: Path) -> None:
    src, out = GGUFReader(moe8), GGUFReader(shard)
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    keep = sorted(KEEP)
    n_sliced = 0
    for a, b in zip(src.tensors, out.tensors, strict=True):
        assert a.tensor_type == b.tensor_type, a.name
        if is_expert_tensor(a.name):
            n_sliced += 1
            assert list(b.shape) == [*list(a.shape)[:-1], 3], a.name
            assert np.array_equal(np.asarray(b.data), np.take(a.data, keep, axis=0)), a.name
        else:
            assert list(b.shape) == list(a.shape), a.name
            assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), a.name
    assert n_sliced == SPEC.n_layers * 4
    before, after = fields(src), fields(out)
    assert after.pop("llama.expert_count")[1] == 3 and before.pop("llama.expert_count")[1] == 8  # type: ignore[index]
    assert after == before  # every other field (token arrays of strings, merges, template…) as it was
    info = inspect_model(shard)
    assert (info.n_experts, info.n_experts_used, info.name) == (3, 2, "tiny-moe8")


def test_quantized_expert_tensors_empty_arrays_and_split_keys_are_handled(tmp_path: Path) -> None:
    """A hand-made MoE header (not a loadable model): Q8_0 experts sliced by block bytes, an
    empty metadata array copied, split.* keys dropped, general.alignment kept."""
    rng = np.random.default_rng(0)
    src = tmp_path / "q8.gguf"
    w = _Writer(str(src), "llama")
    w.add_custom_alignment(64)
    w.add_uint32("llama.expert_count", 4)
    w.add_uint32("llama.expert_used_count", 1)
    w.add_key_value("general.tags", [], GGUFValueType.ARRAY, GGUFValueType.STRING)
    w.add_uint16("split.count", 1)
    experts = rng.standard_normal((4, 16, 64)).astype(np.float32)
    w.add_tensor("blk.0.ffn_up_exps.weight", quantize(experts, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.exp_probs_b.bias", np.arange(4, dtype=np.float32))
    w.add_tensor("blk.0.ffn_up_shexp.weight", quantize(experts[0], GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = tmp_path / "q8-shard.gguf"
    write_shard(src, dst, [3, 0])
    a, b = GGUFReader(src), GGUFReader(dst)
    assert b.alignment == 64 and b.fields["general.alignment"].contents() == 64
    assert "split.count" not in b.fields and b.fields["general.tags"].contents() == [] and b.fields["general.tags"].types == [GGUFValueType.ARRAY]
    assert b.tensors[0].tensor_type == GGMLQuantizationType.Q8_0 and list(b.tensors[0].shape) == [64, 16, 2]
    assert np.array_equal(b.tensors[0].data, a.tensors[0].data[[0, 3]])
    assert b.tensors[1].data.tolist() == [0.0, 3.0]
    assert np.array_equal(b.tensors[2].data, a.tensors[2].data)
    assert all(t.data_offset % 64 == 0 for t in b.tensors)


@pytest.mark.parametrize(("keep", "message"), [
    ([1, 1, 2], "must be distinct: 1 given more than once"),
    ([0, 8], "expert 8 is out of range: the model has 8 experts (0-7)"),
    ([-1, 2], "expert -1 is out of range"),
    ([5], "keeping 1 experts is fewer than the 2 the model uses per token"),
    ([], "keeping 0 experts is fewer than the 2"),
    ([0, True], "whole numbers"),
])
def test_bad_expert_lists_are_refused_in_one_line_and_leave_no_file(moe8: Path, tmp_path: Path, keep: list[int], message: str) -> None:
    dst = tmp_path / "out" / "shard.gguf"
    with pytest.raises(ValueError) as err:
        write_shard(moe8, dst, keep)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not dst.exists() and not list(tmp_path.rglob("*.part"))


def test_a_dense_model_is_refused(tmp_path: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense.gguf", TinyModelSpec())
    with pytest.raises(ValueError, match="is not a mixture-of-experts model"):
        write_shard(dense, tmp_path / "x.gguf", [0])


def test_a_write_that_fails_half_way_leaves_neither_the_shard_nor_its_temp_file(moe8: Path, tmp_path: Path) -> None:
    dst = tmp_path / "shard.gguf"
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 10:
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        write_shard(moe8, dst, KEEP, progress)
    assert len(calls) == 10 and calls[-1][0] < calls[-1][1]
    assert list(tmp_path.iterdir()) == []


def test_ensure_shard_builds_once_with_progress_lines_then_reuses_the_file(moe8: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("mesh_llm.models.moe_shard.PROGRESS_AFTER_SECS", 0.0)  # a build as slow as a real one says how far it is
    lines: list[str] = []
    path = ensure_shard(moe8, "ab" * 16, [0, 1, 2, 3], lines.append)
    assert path == shard_path("ab" * 16, [3, 2, 1, 0]) and path.is_file()
    assert lines[0] == "Building the expert shard of tiny-moe8: 4 of 8 experts…"
    assert lines[-1].startswith("Built the expert shard of tiny-moe8 in ") and "MB" in lines[-1]
    assert 5 <= len(lines) - 2 <= 9 and all("%" in line for line in lines[1:-1])  # about one line per tenth
    inode = path.stat().st_ino  # a rebuild renames a new file into place
    again: list[str] = []
    assert ensure_shard(moe8, "ab" * 16, [3, 2, 1, 0], again.append) == path
    assert again == [] and path.stat().st_ino == inode
    path.write_bytes(path.read_bytes()[:1000])  # a damaged cache file is rebuilt, not served
    assert ensure_shard(moe8, "ab" * 16, [0, 1, 2, 3], again.append) == path
    assert again[0].startswith("Building") and read_gguf(path).n_experts == 4
    monkeypatch.setattr("mesh_llm.models.moe_shard.PROGRESS_AFTER_SECS", 60.0)  # a quick one just says it is done
    quick: list[str] = []
    ensure_shard(moe8, "ab" * 16, [0, 1, 2, 4], quick.append)
    assert len(quick) == 2 and quick[1].startswith("Built")


@pytest.mark.engine
def test_llama_server_serves_a_shard(engine, shard: Path, start_node) -> None:
    node = start_node("--model", str(shard), "--ctx-size", "512")
    node.wait_ready()
    body = json.dumps({"model": "tiny-moe8", "prompt": "the cat", "max_tokens": 12, "temperature": 0}).encode()
    request = urllib.request.Request(node.base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["choices"][0]["text"].strip(), answer
    assert answer["usage"]["completion_tokens"] == 12
    assert "MoE: 3 experts, 2 active" in node.output()
    (entry,) = node.status()["models"]
    assert entry["moe"] == {"experts": 3, "experts_used": 2, "shard": None}  # a file served whole, not a shard of the mesh's


def test_a_build_called_off_leaves_nothing_and_old_shards_are_cleared(moe8: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading

    from mesh_llm.models.moe_shard import ShardCancelled

    monkeypatch.setenv("MESH_LLM_CACHE_DIR", str(tmp_path))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ShardCancelled):
        ensure_shard(moe8, "ab" * 16, [0, 1, 2, 3], lambda line: None, stop)
    folder = shard_path("ab" * 16, [0]).parent
    assert list(folder.iterdir()) == []  # no shard, no temporary file
    built = [ensure_shard(moe8, "ab" * 16, keep, lambda line: None) for keep in ([0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 5])]
    assert sorted(folder.iterdir()) == sorted(built[1:])  # the newest two stay


def test_files_whose_experts_cannot_be_cut_are_told_apart(moe8: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from mesh_llm.models.moe_shard import unshardable

    info = read_gguf(moe8)
    assert unshardable(info) is None
    grove = replace(info, tensors=[*info.tensors, replace(info.tensors[0], name="blk.0.ffn_up_chexps.weight")])
    assert "cannot cut" in (unshardable(grove) or "")
    (exps,) = [t for t in info.tensors if t.name == "blk.0.ffn_up_exps.weight"]
    odd = replace(info, tensors=[replace(exps, shape=(*exps.shape[:-1], 7)) if t is exps else t for t in info.tensors])
    assert "last axis" in (unshardable(odd) or "")
