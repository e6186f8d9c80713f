from pathlib import Path

import pytest
from gguf import GGUFReader
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.errors import UserError
from mesh_llm.models.gguf_file import GGUFError, inspect_model, read_gguf
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
