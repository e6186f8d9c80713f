from pathlib import Path

import pytest

from mesh_llm.models.gguf_file import read_gguf
from mesh_llm.models.tiny import TinyModelSpec, gpt2_byte_alphabet, tiny_vocab, write_tiny_model


def test_byte_alphabet_is_a_bijection() -> None:
    alphabet = gpt2_byte_alphabet()
    assert len(alphabet) == 256 and len(set(alphabet)) == 256
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"


def test_vocab_has_merges_and_chatml_specials() -> None:
    tokens, types, merges, printable = tiny_vocab()
    assert len(tokens) == len(types)
    for m in merges:
        left, right = m.split(" ")
        assert left + right in tokens
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tokens)
    assert all(tokens[i] not in ("<|im_end|>", "<|endoftext|>") for i in printable)


def test_size_follows_arguments(tmp_path: Path) -> None:
    small = read_gguf(write_tiny_model(tmp_path / "a.gguf", TinyModelSpec(n_layers=2, n_embd=32, n_ff=64)))
    big = read_gguf(write_tiny_model(tmp_path / "b.gguf", TinyModelSpec(n_layers=6, n_embd=128, n_ff=256, dtype="f16")))
    assert small.n_layers == 2 and big.n_layers == 6
    assert big.tensor_bytes > small.tensor_bytes
    assert len([t for t in big.tensors if t.name.startswith("blk.5.")]) == 9


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        TinyModelSpec(n_embd=30, n_heads=4)
    with pytest.raises(NotImplementedError):
        TinyModelSpec(n_experts=4)
