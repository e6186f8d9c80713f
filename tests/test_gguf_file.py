import struct
from pathlib import Path

import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_llm.errors import UserError
from mesh_llm.models.gguf_file import MAGIC, GGUFError, GGUFInfo, inspect_model, read_gguf
from mesh_llm.models.tiny import TinyModelSpec


def test_matches_reference_reader(tiny_model: Path) -> None:
    ours = read_gguf(tiny_model)
    ref = GGUFReader(tiny_model)
    assert ours.data_offset == ref.data_offset
    assert [(t.name, t.offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.data_offset - ref.data_offset, int(t.n_bytes)) for t in ref.tensors
    ]
    assert ours.architecture == "llama"
    assert ours.n_layers == TinyModelSpec().n_layers
    assert ours.context_length == TinyModelSpec().context_length
    assert ours.array_lengths["tokenizer.ggml.tokens"] == len(ref.fields["tokenizer.ggml.tokens"].data)


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(min_value=0.0, max_value=0.999))
def test_every_truncation_is_rejected(tiny_model: Path, tmp_path_factory, fraction: float) -> None:
    data = tiny_model.read_bytes()
    cut = tmp_path_factory.mktemp("cut") / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(GGUFError):
        read_gguf(cut)


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(min_size=0, max_size=4096))
def test_random_bytes_never_crash(tmp_path_factory, junk: bytes) -> None:
    f = tmp_path_factory.mktemp("junk") / "junk.gguf"
    f.write_bytes(b"GGUF" + junk)
    try:
        read_gguf(f)
    except GGUFError:
        pass


def test_not_gguf_is_a_user_error(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(UserError, match="not a usable GGUF model: not a GGUF file"):
        inspect_model(f)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model file not found"):
        inspect_model(tmp_path / "nope.gguf")


# --- hostile headers: every malformed file is one line, fast, never a traceback ---------------

BIG_NUMBERS = [0, 1, 3, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 62, (1 << 63) + 1, (1 << 64) - 1]


def _header_size(model: Path) -> int:
    return read_gguf(model).data_offset


def _use_like_a_node(info: GGUFInfo) -> None:
    """What the node computes from a header it accepted: none of it may blow up."""
    from mesh_llm.engine.llama_server import choose_ctx, fallback_chat_template, is_embedding_model
    from mesh_llm.models.fingerprint import fingerprint
    from mesh_llm.models.vocab import vocab_mismatch, vocab_of
    from mesh_llm.serving.prepare import memory_need

    ctx = choose_ctx(None, info.context_length)
    memory_need(info, ctx)
    vocab_of(info)
    vocab_mismatch(info, info)
    fingerprint(info)
    fallback_chat_template(info.metadata)
    is_embedding_model(info.metadata)
    assert info.name is not None and info.n_layers >= 0 and info.tensor_bytes >= 0


def _accepted_or_one_line(path: Path) -> None:
    try:
        info = inspect_model(path)
    except UserError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc) and str(exc).isprintable(), repr(str(exc))
        return
    _use_like_a_node(info)


@st.composite
def mutated_headers(draw: st.DrawFn, data: bytes, header: int) -> bytes:
    """The tiny model with its header damaged: bytes overwritten, counts and lengths set to
    extremes, bytes inserted or deleted, the file cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, header - 1))
        kind = draw(st.sampled_from(["bytes", "u64", "u32", "insert", "delete"]))
        if kind == "bytes":
            out[at : at + 4] = draw(st.binary(min_size=1, max_size=4)).ljust(len(out[at : at + 4]), b"\0")[: len(out[at : at + 4])]
        elif kind in ("u64", "u32"):
            size = 8 if kind == "u64" else 4
            value = draw(st.sampled_from(BIG_NUMBERS) | st.integers(0, (1 << (8 * size)) - 1))
            out[at : at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at : at + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        del out[draw(st.integers(0, len(out))) :]
    return bytes(out)


@pytest.fixture(scope="module")
def tiny_bytes(tiny_model: Path) -> tuple[bytes, int]:
    return tiny_model.read_bytes(), _header_size(tiny_model)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "hostile.gguf"


@settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_damaged_header_is_accepted_or_one_line(tiny_bytes: tuple[bytes, int], scratch: Path, data: st.DataObject) -> None:
    raw, header = tiny_bytes
    scratch.write_bytes(data.draw(mutated_headers(raw, header)))
    _accepted_or_one_line(scratch)


@settings(max_examples=200, deadline=5000)
@given(version=st.sampled_from([2, 3]), n_tensors=st.sampled_from(BIG_NUMBERS), n_kv=st.sampled_from(BIG_NUMBERS),
       body=st.binary(max_size=512), values=st.lists(st.sampled_from(BIG_NUMBERS), max_size=8))
def test_a_made_up_header_is_one_line(scratch: Path, version: int, n_tensors: int, n_kv: int, body: bytes, values: list[int]) -> None:
    """Headers from scratch: extreme counts, then extreme lengths/types/counts and junk."""
    scratch.write_bytes(MAGIC + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(v.to_bytes(8, "little") for v in values) + body)
    _accepted_or_one_line(scratch)


def _key_value_at(data: bytes, key: bytes) -> int:
    """Where the value type of metadata `key` starts (just past the key string)."""
    return data.index(key) + len(key)


def _written(path: Path, strings: dict[str, str], arch: str = "llama", numbers: dict[str, list[int]] | None = None) -> Path:
    """A well-formed GGUF with these string values and arrays of u64s, and no tensors."""
    from gguf import GGUFValueType, GGUFWriter

    w = GGUFWriter(path, arch)
    for key, value in strings.items():
        w.add_string(key, value)
    for key, values in (numbers or {}).items():
        w.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _corrupt(tiny_model: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    data = bytearray(tiny_model.read_bytes())
    if name == "huge block_count":  # would size a per-layer list of 4 billion entries
        at = _key_value_at(data, b"llama.block_count")
        data[at : at + 8] = struct.pack("<II", 4, 0xFFFFFFFF)
        fragment = "llama.block_count is 4294967295"
    elif name == "block_count as text":  # a well-formed file whose numbers are not numbers
        return _written(tmp_path / "corrupt.gguf", {"llama.block_count": "many"}), "llama.block_count is 'many'"
    elif name == "architecture with escapes":  # it is printed in the node's start line
        return _written(tmp_path / "corrupt.gguf", {}, arch="llama\n\x1b[2J"), "bad general.architecture 'llama\\n\\x1b[2J'"
    elif name == "token texts that are numbers":  # the draft check walks them as length-prefixed strings
        path = _written(tmp_path / "corrupt.gguf", {"tokenizer.ggml.model": "gpt2"}, numbers={"tokenizer.ggml.tokens": [1 << 40] * 10})
        return path, "tokenizer.ggml.tokens holds elements of type 10, not strings"
    elif name == "tokenizer type with a newline":  # it is printed in draft-pairing errors
        return _written(tmp_path / "corrupt.gguf", {"tokenizer.ggml.model": "gpt2\nmesh-llm: ok"}), "bad tokenizer.ggml.model 'gpt2\\nmesh-llm: ok'"
    elif name == "misaligned tensor":  # llama-server would refuse it only after the engine started
        at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
        n_dims = struct.unpack_from("<I", data, at)[0]
        at += 4 + 8 * n_dims + 4
        data[at : at + 8] = struct.pack("<Q", 1)
        fragment = "tensor 'token_embd.weight' starts at offset 1, not a multiple of the alignment 32"
    elif name == "duplicate tensor":
        at = data.index(b"blk.0.attn_norm.weight")
        data[at : at + 5] = b"blk.1"
        fragment = "tensor 'blk.1.attn_norm.weight' is listed twice"
    elif name == "alignment 3":  # general.file_type has the length of general.alignment
        at = data.index(b"general.file_type")
        data[at : at + 17] = b"general.alignment"
        data[at + 17 : at + 25] = struct.pack("<II", 4, 3)
        fragment = "bad alignment"
    elif name == "huge key count":
        data[16:24] = struct.pack("<Q", (1 << 64) - 1)
        fragment = "implausible counts"
    elif name == "more keys than the file holds":  # under the hard cap, over what 739 KB can encode
        data[16:24] = struct.pack("<Q", 500_000)
        fragment = "implausible counts: 39 tensors and 500000 metadata keys"
    elif name == "huge string length":
        data[24:32] = struct.pack("<Q", (1 << 63) + 5)
        fragment = "string runs past the end"
    elif name == "nested array":
        at = _key_value_at(data, b"tokenizer.ggml.token_type")
        data[at : at + 8] = struct.pack("<II", 9, 9)
        fragment = "unsupported array element type 9 for 'tokenizer.ggml.token_type'"
    else:
        raise AssertionError(name)
    out = tmp_path / "corrupt.gguf"
    out.write_bytes(bytes(data))
    return out, fragment


CORRUPTIONS = [
    "huge block_count", "block_count as text", "architecture with escapes", "tokenizer type with a newline", "token texts that are numbers", "misaligned tensor", "duplicate tensor",
    "alignment 3", "huge key count", "more keys than the file holds", "huge string length", "nested array",
]


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_crafted_corruptions_are_refused_before_any_use(tiny_model: Path, tmp_path: Path, name: str) -> None:
    path, fragment = _corrupt(tiny_model, tmp_path, name)
    with pytest.raises(UserError, match="not a usable GGUF model") as refused:
        inspect_model(path)
    assert fragment in str(refused.value) and str(refused.value).isprintable()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_crafted_corruptions_are_one_line_from_the_cli(tiny_model: Path, tmp_path: Path, name: str) -> None:
    from tests.conftest import assert_one_line_error, free_port, run_cli

    path, fragment = _corrupt(tiny_model, tmp_path, name)
    assert_one_line_error(run_cli("models", "show", str(path)), fragment, "not a usable GGUF model")
    if name in ("huge block_count", "alignment 3"):  # the node path too (it starts no engine for these)
        assert_one_line_error(run_cli("--model", str(path), "--port", str(free_port()), "--state-dir", str(tmp_path / "s")), fragment)


def test_a_dense_model_is_not_moe(tiny_model: Path) -> None:
    info = read_gguf(tiny_model)
    assert (info.is_moe, info.n_experts, info.n_experts_used, info.n_expert_groups) == (False, 0, 0, 0)


def test_experts_are_read_from_the_header(tmp_path: Path) -> None:
    from mesh_llm.models.tiny import write_tiny_model

    info = read_gguf(write_tiny_model(tmp_path / "moe.gguf", TinyModelSpec(n_layers=1, n_experts=8, n_experts_used=3)))
    assert (info.is_moe, info.n_experts, info.n_experts_used, info.n_expert_groups) == (True, 8, 3, 0)


def test_expert_groups_are_read_under_the_files_architecture(tmp_path: Path) -> None:
    # a header-only file as DeepSeek-style models carry it: keys under their own arch name
    from gguf import GGUFWriter

    path = tmp_path / "grouped.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    w.add_block_count(1)
    w.add_expert_count(256)
    w.add_expert_used_count(8)
    w.add_expert_group_count(8)
    w.add_expert_group_used_count(4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf(path)
    assert (info.is_moe, info.n_experts, info.n_experts_used, info.n_expert_groups) == (True, 256, 8, 8)


def test_an_expert_group_count_that_is_no_count_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "bad.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_int32("llama.expert_group_count", -3)  # a signed value: no count
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="llama.expert_group_count is -3"):
        read_gguf(path)


@pytest.mark.parametrize(("experts", "used", "words"), [
    (513, 2, "llama.expert_count is 513: a whole number up to 512 is needed"),  # llama.cpp's LLAMA_MAX_EXPERTS
    (4, 5, "llama.expert_used_count is 5, more than its 4 experts"),
])
def test_expert_counts_llama_cpp_would_assert_on_are_refused_in_one_line(tmp_path: Path, experts: int, used: int, words: str) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "bad-experts.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=words):
        read_gguf(path)
    with pytest.raises(UserError, match="is not a usable GGUF model"):
        inspect_model(path)
